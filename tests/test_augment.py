"""Batched augmentations: shapes and [0, 1] ranges, per-sample randomness, seeded determinism, any device."""

from functools import partial

import pytest
import torch

from pipeline import augment
from pipeline.errors import UserError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TRANSFORMS = {
    "hflip": augment.hflip,
    "affine": augment.affine,
    "random_resized_crop": augment.random_resized_crop,
    "color_jitter": partial(augment.color_jitter, p=1.0),
    "gaussian_blur": partial(augment.gaussian_blur, p=1.0),
    "gaussian_noise": partial(augment.gaussian_noise, std=(0.02, 0.1), p=1.0),
}
RANDOM = {**TRANSFORMS, **{f"preset:{k}": v for k, v in augment.PRESETS.items() if k != "none"}}
EVERY = {**RANDOM, "preset:none": augment.PRESETS["none"]}


def batch(n=32, channels=1, size=28, device="cpu", seed=0):
    """Random images in [0, 1] (asymmetric, so a flip changes them)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=generator).to(device)


def run(transform, images, seed):
    return transform(images, torch.Generator(device=images.device).manual_seed(seed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 64)])
@pytest.mark.parametrize("name", EVERY)
def test_shape_dtype_device_and_range(name, channels, size, device):
    images = batch(8, channels, size, device)
    out = run(EVERY[name], images, 0)
    assert out.shape == images.shape and out.dtype == images.dtype and out.device == images.device
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_same_output_other_seed_other_output(name, device):
    images = batch(16, device=device)
    first, again, other = run(RANDOM[name], images, 7), run(RANDOM[name], images, 7), run(RANDOM[name], images, 8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", RANDOM)
def test_each_sample_gets_its_own_parameters(name):
    """One image repeated over the batch: a shared parameter draw would give identical outputs."""
    images = batch(1).repeat(32, 1, 1, 1)
    out = run(RANDOM[name], images, 0)
    distinct = {tuple(row.flatten().tolist()) for row in out.round(decimals=5)}
    assert len(distinct) > 1


def test_hflip_flips_about_half_and_exactly():
    images = batch(400)
    out = run(augment.hflip, images, 0)
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped | kept).all())
    assert 0.35 < flipped.float().mean() < 0.65


def test_identity_parameters_leave_images_unchanged():
    images = batch(4)
    assert torch.allclose(run(partial(augment.affine, degrees=0, translate=0, scale=(1, 1)), images, 0), images, atol=1e-5)
    assert torch.allclose(run(partial(augment.random_resized_crop, scale=(1, 1), ratio=(1, 1)), images, 0), images, atol=1e-5)
    assert torch.equal(run(partial(augment.color_jitter, p=0.0), images, 0), images)
    assert torch.equal(run(partial(augment.gaussian_noise, p=0.0), images, 0), images)


def test_two_views_differ_and_are_reproducible():
    images = batch(8)
    a1, b1 = augment.two_views(images, torch.Generator().manual_seed(3))
    a2, b2 = augment.two_views(images, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)
    assert a1.shape == images.shape


def test_build_augment_knows_every_preset_and_refuses_others():
    assert list(augment.preset_names())[:4] == ["none", "flip", "geometric", "geometric+intensity"]
    for name in augment.preset_names():
        assert augment.build_augment(name) is augment.PRESETS[name]
    with pytest.raises(UserError, match="augment='mixup' is unknown"):
        augment.build_augment("mixup")


def test_affine_brings_in_black_like_torchvision():
    ones = torch.ones(64, 1, 28, 28)
    shifted = augment.affine(ones, torch.Generator().manual_seed(0), degrees=0.0, translate=0.2, scale=(1.0, 1.0))
    outside = (shifted < 0.5).float().mean(dim=(1, 2, 3))
    assert outside.max() > 0.1  # up to 20% of the width came from outside the frame, and is 0 (RandomAffine fill=0)


def test_crop_sizes_follow_torchvisions_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    n, scale, ratio = 20000, (0.4, 1.0), (3 / 4, 4 / 3)
    width, height = augment.crop_sizes(n, scale, ratio, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert bool(((width <= 1) & (height <= 1)).all())
    torch.manual_seed(0)
    image = torch.zeros(1, 224, 224)
    boxes = torch.tensor([RandomResizedCrop.get_params(image, list(scale), list(ratio))[2:] for _ in range(n)]) / 224
    for ours, theirs in ((width * height, boxes[:, 0] * boxes[:, 1]), (width, boxes[:, 1]), (height, boxes[:, 0])):
        assert ours.median().item() == pytest.approx(theirs.median().item(), abs=0.01)
    full_width = (width > 0.995).float().mean().item()
    assert full_width == pytest.approx((boxes[:, 1] > 0.995).float().mean().item(), abs=0.015)  # capping made 22%, not 12%
