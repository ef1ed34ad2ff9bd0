"""Exact batch-norm statistics before evaluation: computed right, wired into both training loops,
recomputed in supervised training only while the running averages can be stale."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import batchnorm, config
from pipeline.batchnorm import recompute_bn_statistics, statistics_sample
from pipeline.data import load_splits, stratified_subset, to_float
from pipeline.models import ModelSpec, build_classifier
from pipeline.pretrain import PretrainSettings, pretrain
from pipeline.runtime import seed_everything
from pipeline.ssl import build_ssl
from pipeline.train import TrainSettings, steps_per_epoch, train_classifier


def first_bn(model: nn.Module) -> nn.modules.batchnorm._BatchNorm:
    return next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def first_bn_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the first batch-norm layer receives (it does not depend on any batch-norm statistics)."""
    seen = []
    hook = first_bn(model).register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].double()))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(to_float(images))
    model.train(was_training)
    hook.remove()
    return seen[0]


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_statistics_are_the_mean_and_variance_over_the_images():
    seed_everything(0)
    model = build_classifier(ModelSpec("smallcnn")).eval()
    images = random_images(40)
    bn = first_bn(model)
    recompute_bn_statistics(model, images, batch_size=1024)
    out = first_bn_input(model, images)
    assert bn.running_mean.double() == pytest.approx(out.mean(dim=(0, 2, 3)).numpy(), abs=1e-5)
    assert bn.running_var.double() == pytest.approx(out.var(dim=(0, 2, 3), unbiased=True).numpy(), rel=1e-4)
    assert not model.training and bn.momentum == 0.1  # mode and momentum restored


def test_batches_of_unequal_size_are_weighted_by_their_size():
    seed_everything(1)
    model = build_classifier(ModelSpec("smallcnn"))
    images = random_images(25, seed=1)
    bn = first_bn(model)
    recompute_bn_statistics(model, images, batch_size=10)  # 10 + 10 + 5 images
    assert bn.running_mean.double() == pytest.approx(first_bn_input(model, images).mean(dim=(0, 2, 3)).numpy(), abs=1e-5)
    chunks = images.split(10)
    variances = [len(c) * first_bn_input(model, c).var(dim=(0, 2, 3), unbiased=True) for c in chunks]
    assert bn.running_var.double() == pytest.approx((sum(variances) / 25).numpy(), rel=1e-4)
    assert model.training


def test_modules_keep_the_modes_they_had():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model[2].eval()
    recompute_bn_statistics(model, random_images(8))
    assert model.training and model[1].training and not model[2].training


def test_a_frozen_encoder_keeps_its_statistics():
    seed_everything(2)
    model = build_classifier(ModelSpec("smallcnn"), finetune="head")
    bn = first_bn(model)
    bn.running_mean.fill_(0.25)
    recompute_bn_statistics(model, random_images(20, seed=2))
    assert torch.all(bn.running_mean == 0.25)


@pytest.fixture()
def splits(synthetic_root):
    return load_splits("breastmnist", 28, str(synthetic_root), torch.device("cpu"))


def test_supervised_training_evaluates_with_the_training_images_statistics(splits):
    # 10% of the labels in batches of 128: one optimizer step per epoch, so the running averages
    # alone would still be mostly their initial 0 mean / 1 variance after three epochs
    train = splits.train.subset(stratified_subset(splits.train.labels.numpy(), 0.1, 0))
    cfg = {**config.resolve("baseline", "breastmnist", {}), "epochs": 3, "bootstrap": 0}
    seed_everything(0)
    model = build_classifier(ModelSpec("smallcnn"))
    train_classifier(model, train, splits.val, TrainSettings.of(cfg))
    bn = first_bn(model)
    out = first_bn_input(model, train.images)
    assert bn.running_mean.double() == pytest.approx(out.mean(dim=(0, 2, 3)).numpy(), abs=1e-5)
    assert bn.running_var.double() == pytest.approx(out.var(dim=(0, 2, 3), unbiased=True).numpy(), rel=1e-4)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_pretraining_monitors_and_saves_the_encoder_with_the_training_images_statistics(method, splits):
    cfg = {**config.resolve("ssl_pretrain", "breastmnist", {}), "method": method, "steps": 6, "knn_every": 3, "batch_size": 32, "warmup_steps": 1, "queue_size": 64}
    seed_everything(0)
    module = build_ssl(method, build_classifier(ModelSpec("smallcnn")), cfg)
    pretrain(module, splits, PretrainSettings.of(cfg))
    bn = first_bn(module.backbone)
    out = first_bn_input(module.backbone, splits.train.images)
    assert bn.running_mean.double() == pytest.approx(out.mean(dim=(0, 2, 3)).numpy(), abs=1e-5)
    if method == "simclr":  # MoCo's split BN averages the chunks' variances: the same in expectation only
        assert bn.running_var.double() == pytest.approx(out.var(dim=(0, 2, 3), unbiased=True).numpy(), rel=1e-4)
    assert np.isfinite(bn.running_var.numpy()).all()


def test_a_last_batch_of_one_is_folded_into_the_one_before():
    seed_everything(2)
    model = build_classifier(ModelSpec("resnet18", stem="imagenet"))  # 1×1 feature maps at 28 px
    images = random_images(9, seed=2)
    recompute_bn_statistics(model, images, batch_size=4)  # 4 + 5, not 4 + 4 + 1 (which batch norm refuses)
    bn = first_bn(model)
    chunks = [images[:4], images[4:]]
    variances = [len(c) * first_bn_input(model, c).var(dim=(0, 2, 3), unbiased=True) for c in chunks]
    assert bn.running_var.double() == pytest.approx((sum(variances) / 9).numpy(), rel=1e-4)


def recompute_calls(monkeypatch) -> list[int]:
    """Sizes of the image sets `train_classifier` recomputes statistics over, one entry per call."""
    calls = []
    real = batchnorm.recompute_bn_statistics

    def spy(model, images, *args, **kwargs):
        calls.append(len(images))
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(batchnorm, "recompute_bn_statistics", spy)
    return calls


def test_a_long_training_evaluates_with_its_running_averages(splits, monkeypatch):
    # recomputed while the training has made fewer than STALE_BELOW_STEPS optimizer steps, left to
    # momentum after that, where they evaluate as well (bench/precise_bn_need.py); here 3 steps
    # stand for the measured threshold, with one step an epoch (96 images, batch 128)
    monkeypatch.setattr(batchnorm, "STALE_BELOW_STEPS", 3)
    calls = recompute_calls(monkeypatch)
    cfg = {**config.resolve("baseline", "breastmnist", {}), "epochs": 5, "bootstrap": 0}
    assert steps_per_epoch(len(splits.train), cfg["batch_size"]) == 1
    seed_everything(0)
    model = build_classifier(ModelSpec("smallcnn"))
    result = train_classifier(model, splits.train, splits.val, TrainSettings.of(cfg))
    assert calls == [len(splits.train)] * 2 and len(result.history) == 5  # epochs 1 and 2 only
    bn = first_bn(model)
    out = first_bn_input(model, splits.train.images)
    assert bn.running_mean.double() != pytest.approx(out.mean(dim=(0, 2, 3)).numpy(), abs=1e-5)
    assert int(bn.num_batches_tracked) == 1 + 3  # the last recomputation (one batch), then three training steps


def test_a_large_training_split_recomputes_over_a_fixed_sample(splits, monkeypatch):
    monkeypatch.setattr(batchnorm, "SAMPLE_IMAGES", 6)
    calls = recompute_calls(monkeypatch)
    train = splits.train.subset(stratified_subset(splits.train.labels.numpy(), 0.1, 0))  # 10 images, one step an epoch
    cfg = {**config.resolve("baseline", "breastmnist", {}), "epochs": 2, "bootstrap": 0}
    seed_everything(0)
    model = build_classifier(ModelSpec("smallcnn"))
    train_classifier(model, train, splits.val, TrainSettings.of(cfg))
    assert calls == [6, 6]
    sample = statistics_sample(train.images, 6, cfg["seed"])
    assert torch.equal(sample, statistics_sample(train.images, 6, cfg["seed"]))
    assert len({bytes(image.numpy()) for image in sample}) == 6
    bn = first_bn(model)
    assert bn.running_mean.double() == pytest.approx(first_bn_input(model, sample).mean(dim=(0, 2, 3)).numpy(), abs=1e-5)
    assert statistics_sample(train.images, 10, 0) is train.images
