"""Corruptions as seeded, batched pure functions; MC dropout with batch norm kept in eval mode."""

import numpy as np
import pytest
import torch

from pipeline.steps import robustness
from pipeline.data import Split
from pipeline.models import ModelSpec, build_classifier


def batch(n: int = 6, size: int = 28, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand((n, 1, size, size), generator=generator)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", robustness.CORRUPTIONS)
def test_corruptions_keep_shape_dtype_and_range(name):
    x = batch()
    for severity in range(1, 6):
        y = robustness.corrupt(x, name, severity, gen())
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1
        assert not torch.equal(y, x)
    assert torch.equal(x, batch()), "the input batch must not be modified"


@pytest.mark.parametrize("name", robustness.CORRUPTIONS)
def test_corruption_effect_grows_with_severity(name):
    x = batch(n=16)
    effect = [float((robustness.corrupt(x, name, s, gen()) - x).abs().mean()) for s in range(1, 6)]
    assert effect == sorted(effect) and effect[0] < effect[-1]


def test_noise_is_seeded_and_per_sample():
    x = batch()
    first = robustness.corrupt(x, "gaussian_noise", 3, gen(7))
    assert torch.equal(first, robustness.corrupt(x, "gaussian_noise", 3, gen(7)))
    assert not torch.equal(first, robustness.corrupt(x, "gaussian_noise", 3, gen(8)))
    same = x[:1].repeat(4, 1, 1, 1)
    noisy = robustness.corrupt(same, "gaussian_noise", 3, gen())
    assert not torch.equal(noisy[0], noisy[1])
    seeds = {robustness.corruption_seed(0, n, s) for n in robustness.CORRUPTIONS for s in range(1, 6)}
    assert len(seeds) == 20


def model_and_split(dropout: float = 0.0):
    torch.manual_seed(0)
    model = build_classifier(ModelSpec(dropout=dropout))
    images = (255 * batch(n=10)).to(torch.uint8)
    return model, Split(images, torch.tensor([0, 1] * 5))


def test_mc_dropout_passes_differ_and_batch_norm_stays_in_eval():
    model, split = model_and_split()
    running = model.encoder.features[1].running_mean.clone()
    p, enabled_here = robustness.enable_mc_dropout(model, 0.3)
    assert (p, enabled_here) == (0.3, True)
    assert model.dropout.training and not model.encoder.features[1].training
    logits = robustness.mc_dropout_logits(model, split, passes=5, seed=0, batch_size=4, amp=False)
    assert logits.shape == (5, 10)
    assert not np.allclose(logits[0], logits[1])
    assert torch.equal(model.encoder.features[1].running_mean, running)
    again = robustness.mc_dropout_logits(model, split, passes=5, seed=0, batch_size=10, amp=False)
    assert np.allclose(logits, again, atol=1e-5), "seeded, and independent of the batch size"


def test_mc_dropout_keeps_a_trained_dropout_rate():
    model, _ = model_and_split(dropout=0.5)
    assert robustness.enable_mc_dropout(model, 0.2) == (0.5, False)


def test_uncertainty_shapes_and_entropy_bounds():
    logits = np.random.default_rng(0).normal(size=(7, 12))
    u = robustness.uncertainty(logits)
    assert all(v.shape == (12,) for v in u.values())
    assert np.all((u["entropy"] >= 0) & (u["entropy"] <= np.log(2) + 1e-12))
    assert np.all(u["mutual_info"] >= -1e-12) and np.all(u["mutual_info"] <= u["entropy"] + 1e-12)
    # Identical passes: no disagreement between masks, so no mutual information.
    assert np.allclose(robustness.uncertainty(np.repeat(logits[:1], 4, axis=0))["mutual_info"], 0, atol=1e-9)
    # Two passes that disagree (p = 0.95 and 0.05): mean p = 0.5, so H = ln 2, each pass has
    # H(0.05), and the mutual information is their difference, clearly above zero.
    z = np.log(0.95 / 0.05)
    u = robustness.uncertainty(np.array([[z], [-z]]))
    h = -(0.05 * np.log(0.05) + 0.95 * np.log(0.95))
    assert u["prob"][0] == pytest.approx(0.5) and u["entropy"][0] == pytest.approx(np.log(2))
    assert u["mutual_info"][0] == pytest.approx(np.log(2) - h) and u["mutual_info"][0] > 0.4


def test_error_detection_auroc_rewards_uncertainty_on_errors():
    errors = np.array([0, 0, 0, 1, 1])
    assert robustness.error_detection_auroc(np.array([0.1, 0.2, 0.3, 0.6, 0.5]), errors) == 1.0
    assert robustness.error_detection_auroc(np.array([0.6, 0.5, 0.4, 0.1, 0.2]), errors) == 0.0
