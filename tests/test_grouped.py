"""Grouped grid members equal solo runs: each member's per-step losses, validation metrics, selected
epoch and selected weights match `train_classifier` with the same seed, subset and initial weights,
and the comparison catches members coupled through batch norm or data order.

In float32 two computations of one run that differ only in rounding (the grouped convolutions'
summation order, or the solo path in another memory layout) drift apart over training: Adam turns
the rounding of near-zero gradients into steps of about ±lr, and batch norm over a few images
amplifies it further (measured on these tests' members: solo NCHW vs. solo NHWC differ by 2e-3 to
2e-2 in loss after 6–8 epochs). So the equality is checked exactly where rounding cannot hide a
coupling: in float64, with every config the grids use, to 1e-7; and in float32, with SGD and one
step an epoch (no normalised steps), to 1e-5.
"""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import batchnorm, config, grouped_model, grouped_train, train
from pipeline.augment import build_augment
from pipeline.data import load_splits, stratified_subset
from pipeline.errors import UserError
from pipeline.grouped_model import GroupedClassifier
from pipeline.grouped_train import Member, train_members
from pipeline.models import ModelSpec, build_classifier
from pipeline.runtime import prepare_model, seed_everything
from pipeline.train import TrainSettings, train_classifier

SEEDS = (0, 1, 2)
FLOAT64_TOLERANCE = 1e-7
FLOAT32_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def splits(synthetic_root):
    return load_splits("breastmnist", 28, str(synthetic_root), torch.device("cpu"))


@pytest.fixture(autouse=True)
def one_thread():
    """Solo and grouped runs in one thread: the comparison then sees only the grouping's rounding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def float64(monkeypatch) -> torch.dtype:
    """float64 as the default dtype (augmentation parameters), and batches converted to float64
    wherever the solo and grouped paths draw them."""
    for module in (train, batchnorm, grouped_train):
        monkeypatch.setattr(module, "to_float", lambda images: images.double().div_(255.0))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(default)


def cfg(**overrides):
    return {**config.resolve("baseline", "breastmnist", {}), "epochs": 6, "eval_every": 2, "batch_size": 32, "augment": "flip", "bootstrap": 0, **overrides}


def members(splits, fraction: float, dtype: torch.dtype = torch.float32) -> list[Member]:
    """Members that differ in everything a grid member owns: initial weights, subset and seed."""
    labels = splits.train.labels.numpy()
    out = []
    for seed in SEEDS:
        seed_everything(seed)
        model = build_classifier(ModelSpec("smallcnn")).to(dtype)
        out.append(Member(model, splits.train.subset(stratified_subset(labels, fraction, seed)), seed))
    return out


def solo_results(group: list[Member], splits, settings):
    """Each member trained alone by the solo path, its model prepared as a grid child's is."""
    return [
        train_classifier(
            prepare_model(copy.deepcopy(m.model), torch.device("cpu"), settings),
            m.train,
            splits.val,
            TrainSettings.of({**settings, "seed": m.seed}),
            build_augment(settings["augment"]),
        )
        for m in group
    ]


def mismatches(grouped, solo, tolerance: float = FLOAT64_TOLERANCE) -> list[str]:
    """Where grouped members differ from their solo runs beyond the tolerance."""
    found = []
    for k, (mine, theirs) in enumerate(zip(grouped, solo)):
        if len(mine.history) != len(theirs.history) or mine.best_epoch != theirs.best_epoch:
            found.append(f"member {k}: epochs evaluated or selected differ")
        for a, b in zip(mine.history, theirs.history):
            found += [f"member {k} epoch {a['epoch']} {key}: {a[key]} vs {b[key]}" for key in a if not math.isclose(a[key], b[key], rel_tol=tolerance, abs_tol=tolerance)]
        for key, value in theirs.best_state.items():
            if not torch.allclose(mine.best_state[key].double(), value.double(), rtol=tolerance, atol=tolerance):
                found.append(f"member {k} selected {key} differs")
    return found


def run_both(splits, fraction: float, settings, dtype: torch.dtype = torch.float32):
    group = members(splits, fraction, dtype)
    assert len({len(m.train) for m in group}) == 1 and len({tuple(m.train.labels.tolist()) for m in group}) == len(SEEDS)
    solo = solo_results(group, splits, settings)
    assert len({r.history[-1]["val_loss"] for r in solo}) == len(SEEDS)  # precondition: the members really differ
    return train_members(group, splits.val, TrainSettings.of(settings), build_augment(settings["augment"])), solo


@pytest.mark.parametrize(
    "fraction, overrides",
    [
        (0.25, {"eval_every": 1}),  # one step an epoch: the history is per step
        (0.3, {"batch_size": 7}),  # four steps an epoch, a one-image batch folded
        (0.25, {"encoder_lr_scale": 0.1, "optimizer": "adamw", "weight_decay": 0.05, "augment": "geometric"}),
    ],
)
def test_each_member_equals_its_solo_run_in_float64(splits, float64, fraction, overrides):
    grouped, solo = run_both(splits, fraction, cfg(**overrides), float64)
    assert not mismatches(grouped, solo), mismatches(grouped, solo)[:5]


def test_each_member_equals_its_solo_run_in_float32_per_step(splits):
    grouped, solo = run_both(splits, 0.25, cfg(optimizer="sgd", lr=0.05, eval_every=1))
    assert not mismatches(grouped, solo, FLOAT32_TOLERANCE), mismatches(grouped, solo, FLOAT32_TOLERANCE)[:5]


def test_members_do_not_move_the_initial_weights(splits):
    settings = cfg()
    group = members(splits, 0.25)
    before = [copy.deepcopy(m.model.state_dict()) for m in group]
    train_members(group, splits.val, TrainSettings.of(settings))
    assert all(torch.equal(v, state[k]) for m, state in zip(group, before) for k, v in m.model.state_dict().items())


def test_grouped_state_round_trips(splits):
    group = members(splits, 0.25)
    model = GroupedClassifier([m.model for m in group])
    for k, member in enumerate(group):
        assert all(torch.equal(v, member.model.state_dict()[key]) for key, v in model.member_state(k).items())


class SharedBatchNorm(nn.BatchNorm2d):
    """A coupled batch norm: statistics over every member's channel block together."""

    def __init__(self, norm: nn.BatchNorm2d, members: int):
        super().__init__(norm.num_features * members)
        self.members = members

    def forward(self, x):
        n, c, h, w = x.shape
        shared = nn.functional.batch_norm(
            x.reshape(n, self.members, c // self.members, h, w).transpose(0, 1).reshape(n * self.members, c // self.members, h, w), None, None, training=True
        )
        return (
            shared.reshape(self.members, n, c // self.members, h, w).transpose(0, 1).reshape(n, c, h, w) * self.weight[None, :, None, None]
            + self.bias[None, :, None, None]
        )


def test_the_comparison_catches_shared_batch_norm_statistics(splits, float64, monkeypatch):
    settings = cfg()
    group = members(splits, 0.25, float64)
    solo = solo_results(group, splits, settings)
    monkeypatch.setattr(grouped_model, "grouped_batch_norm", SharedBatchNorm)
    assert mismatches(train_members(group, splits.val, TrainSettings.of(settings), build_augment("flip")), solo)


def test_the_comparison_catches_a_shared_data_order(splits, float64, monkeypatch):
    settings = cfg(batch_size=8)
    group = members(splits, 0.5, float64)
    solo = solo_results(group, splits, settings)
    shared = grouped_train.member_batches
    monkeypatch.setattr(grouped_train, "member_batches", lambda n, size, seed, device: shared(n, size, 0, device))
    assert mismatches(train_members(group, splits.val, TrainSettings.of(settings), build_augment("flip")), solo)


def test_a_diverging_member_fails_alone(splits, float64):
    settings = cfg(epochs=2)
    group = members(splits, 0.25, float64)
    with torch.no_grad():
        group[1].model.head.bias.fill_(float("nan"))
    grouped = train_members(group, splits.val, TrainSettings.of(settings), build_augment(settings["augment"]))
    solo = solo_results([group[0], group[2]], splits, settings)
    assert "training loss became nan" in str(grouped[1])
    assert not mismatches([grouped[0], grouped[2]], solo)


def test_groups_that_cannot_step_together_are_refused(splits):
    settings = cfg()
    group = members(splits, 0.25)
    unequal = [group[0], Member(group[1].model, splits.train.subset(np.arange(10)), 1)]
    with pytest.raises(UserError, match="one size"):
        train_members(unequal, splits.val, TrainSettings.of(settings))
    group[0].model.set_dropout(0.2)
    with pytest.raises(UserError, match="dropout"):
        GroupedClassifier([m.model for m in group])
