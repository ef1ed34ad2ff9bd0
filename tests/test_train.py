"""The supervised loop: it learns, it is deterministic, it resumes exactly, it stops on NaN."""

import copy

import numpy as np
import pytest
import torch

from pipeline.checkpoint import CheckpointSchedule
from pipeline import config, metrics
from pipeline.augment import identity
from pipeline.data import Split, fold_single, load_splits
from pipeline.errors import DivergenceError
from pipeline.models import ModelSpec, build_classifier
from pipeline.runtime import seed_everything
from pipeline.train import TrainSettings, make_optimizer, make_scheduler, predict_logits, train_classifier, train_epoch


@pytest.fixture()
def splits(synthetic_root):
    return load_splits("breastmnist", 28, str(synthetic_root), torch.device("cpu"))


def cfg(**overrides):
    return {**config.resolve("baseline", "breastmnist", {}), "epochs": 4, "batch_size": 32, "bootstrap": 0, **overrides}


def settings(**overrides):
    return TrainSettings.of(cfg(**overrides))


def fresh_model(seed=0):
    seed_everything(seed)
    return build_classifier(ModelSpec("smallcnn"))


def test_training_learns_the_synthetic_signal(splits):
    model = fresh_model()
    result = train_classifier(model, splits.train, splits.val, settings(epochs=6, lr=3e-3))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    model.load_state_dict(result.best_state)
    logits = predict_logits(model, splits.test)
    assert metrics.auroc(metrics.sigmoid(logits), splits.test.labels.numpy()) > 0.8


def test_best_state_is_a_copy_of_the_best_epoch_not_the_last(splits):
    model = fresh_model()
    snapshots = {}

    def keep(epoch, row, state):
        snapshots[epoch] = copy.deepcopy(model.state_dict())

    result = train_classifier(model, splits.train, splits.val, settings(epochs=5, lr=3e-2), on_epoch=keep)
    aurocs = [row["val_auroc"] for row in result.history]
    assert result.best_epoch == int(np.argmax(aurocs)) + 1
    assert result.best_epoch != len(result.history)  # precondition: the best epoch is not the last
    best = snapshots[result.best_epoch]
    assert all(torch.equal(v, best[k]) for k, v in result.best_state.items())
    assert all(v.data_ptr() != model.state_dict()[k].data_ptr() for k, v in result.best_state.items())


def test_same_seed_gives_identical_history_and_another_seed_another(splits):
    first = train_classifier(fresh_model(), splits.train, splits.val, settings())
    second = train_classifier(fresh_model(), splits.train, splits.val, settings())
    assert first.history == second.history
    # same initial weights, another training seed: shuffling and augmentation must change
    other = train_classifier(fresh_model(), splits.train, splits.val, settings(seed=1, augment="flip"))
    flipped = train_classifier(fresh_model(), splits.train, splits.val, settings(augment="flip"))
    assert other.history != flipped.history


def test_resume_from_a_saved_state_matches_an_uninterrupted_run(splits):
    saved = {}

    def keep_epoch_two(epoch, row, state):
        if epoch == 2:
            saved.update(copy.deepcopy(state()))

    full = train_classifier(fresh_model(), splits.train, splits.val, settings(), on_epoch=keep_epoch_two)
    resumed = train_classifier(fresh_model(seed=99), splits.train, splits.val, settings(), resume=saved)
    assert resumed.history == full.history and resumed.best_epoch == full.best_epoch
    assert all(torch.equal(resumed.best_state[k], full.best_state[k]) for k in full.best_state)


def test_nan_loss_stops_training_with_a_message(splits):
    model = fresh_model()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="training loss became nan"):
        train_classifier(model, splits.train, splits.val, settings())


def test_checkpoints_follow_the_epoch_schedule_but_not_sooner_than_the_minimum_interval():
    def due_epochs(min_seconds: float) -> list[int]:
        now = [0.0]
        schedule = CheckpointSchedule(every=2, last=10, min_seconds=min_seconds, clock=lambda: now[0])

        def after_epoch(epoch: int) -> bool:
            now[0] += 10.0  # ten seconds per epoch
            return schedule.due(epoch)

        return [epoch for epoch in range(1, 11) if after_epoch(epoch)]

    assert due_epochs(0) == [2, 4, 6, 8]  # never after the last epoch: the run logs its final model then
    assert due_epochs(30) == [4, 8]  # 20 s, then 20 s after epoch 4's: too soon
    assert due_epochs(1000) == []  # a run shorter than the interval writes none


def test_encoder_learns_at_lr_times_scale_and_the_head_at_lr():
    model = fresh_model()
    optimizer = make_optimizer(model, settings(lr=1e-3, encoder_lr_scale=0.1))
    head, encoder = optimizer.param_groups
    assert head["lr"] == 1e-3 and encoder["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in encoder["params"]} == {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert len(make_optimizer(model, settings()).param_groups) == 1  # no scale: one group at lr


def test_multistep_schedule_steps_down_at_half_and_three_quarters():
    optimizer = make_optimizer(fresh_model(), settings(lr=1.0))
    scheduler = make_scheduler(optimizer, settings(epochs=8, scheduler="multistep", gamma=0.1))
    rates = []
    for _ in range(8):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_a_training_set_one_past_a_full_batch_trains():
    seed_everything(3)
    model = build_classifier(ModelSpec("resnet18", stem="imagenet"))  # 1×1 feature maps at 28 px
    generator = torch.Generator().manual_seed(3)
    train = Split(torch.randint(0, 256, (9, 1, 28, 28), generator=generator, dtype=torch.uint8), torch.tensor([0, 1] * 4 + [1]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = train_epoch(model, train, optimizer, identity, batch_size=4, seed=0, amp=False, description="test")  # 4 + 5
    assert np.isfinite(loss)
    assert fold_single(list(torch.arange(9).split(4)))[-1].tolist() == [4, 5, 6, 7, 8]
    assert [len(b) for b in fold_single(list(torch.arange(10).split(4)))] == [4, 4, 2]


def test_a_step_budgeted_run_checkpoints_at_the_first_monitor_point_past_each_interval():
    schedule = CheckpointSchedule(every=100, last=400)
    assert [step for step in (30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 330, 360, 390) if schedule.due(step)] == [120, 210, 300]
