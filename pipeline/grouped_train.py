"""Train K grid members of one architecture together, each exactly as `train.train_classifier` trains it alone.

The members run as one `GroupedClassifier` (one launch per layer instead of K), but each keeps what
makes it independent: its data order and augmentation stream from its own epoch seed, its channel
block of every batch norm (batch statistics, running averages, the precise recomputation over a sample of its own
training images), its elements of the optimizer state (Adam, AdamW and SGD update element-wise, so one
optimizer over the concatenated parameters is K optimizers), and its model selection by validation
AUROC. The schedule is shared because it depends on the epoch alone, so members must share the
config (lr, batch size, epochs, ...) and the size of their training subsets: the same label fraction
gives every subset seed the same size, so a grid groups the seeds of one (method, fraction).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.augment import Augment, identity
from pipeline.batchnorm import SAMPLE_IMAGES, recompute_bn_statistics, running_averages_stale, statistics_sample
from pipeline.data import Split, batch_indices, fold_single, to_float
from pipeline.errors import DivergenceError, UserError
from pipeline.grouped_model import GroupedClassifier, check_members, stack_channels
from pipeline.models import Classifier
from pipeline.runtime import autocast, epoch_seed, grad_scaler, prepare_model
from pipeline.train import TrainResult, TrainSettings, epoch_metrics, make_optimizer, make_scheduler, predict_logits, selection_score, steps_per_epoch


@dataclass
class Member:
    """One grid member: its initialised model, its labelled training subset and its seed."""

    model: Classifier
    train: Split
    seed: int


@dataclass
class MemberTrack:
    """A member's model selection so far, or the divergence that ended it."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    best_score: float = -math.inf
    error: DivergenceError | None = None

    def record(self, row: dict[str, float], state: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Add an evaluated epoch; keep its weights when it beats the best so far."""
        self.history.append(row)
        if selection_score(row) > self.best_score:
            self.best_score, self.best_epoch, self.best_state = selection_score(row), int(row["epoch"]), state()

    def result(self) -> TrainResult | DivergenceError:
        return self.error or TrainResult(best_state=self.best_state, best_epoch=self.best_epoch, history=self.history)


def member_batches(n: int, batch_size: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    """A member's index batches of one epoch, drawn as `train.train_epoch` draws them from its seed."""
    return fold_single(list(batch_indices(n, batch_size, torch.Generator().manual_seed(seed), device)))


def train_group_epoch(
    model: GroupedClassifier, trains: list[Split], optimizer: torch.optim.Optimizer, augment: Augment, batch_size: int, seeds: list[int], amp: bool
) -> np.ndarray:
    """One epoch of every member, member k shuffled and augmented from `seeds[k]`; returns each
    member's mean training loss."""
    device = trains[0].images.device
    orders = [member_batches(len(train), batch_size, seed, device) for train, seed in zip(trains, seeds)]
    generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    totals = torch.zeros(len(trains), device=device)
    model.train()
    for indices in zip(*orders):
        images = stack_channels([augment(to_float(train.images[index]), generator) for train, index, generator in zip(trains, indices, generators)])
        targets = torch.stack([train.labels[index] for train, index in zip(trains, indices)], dim=1).float()
        with autocast(device, amp):
            logits = model(images)
        losses = loss_fn(logits.float(), targets).sum(dim=0)
        optimizer.zero_grad(set_to_none=True)
        (losses.sum() / len(indices[0])).backward()
        optimizer.step()
        totals += losses.detach()
    return totals.cpu().double().numpy() / len(trains[0])


def check_group(members: list[Member], device: torch.device, amp: bool) -> None:
    """Refuse groups whose members could not step together, or would be coupled by fp16 loss scaling
    (one member's overflow would skip every member's step)."""
    if len({len(member.train) for member in members}) != 1:
        raise UserError(f"grouped members need training subsets of one size, got {sorted({len(m.train) for m in members})}")
    if grad_scaler(device, amp).is_enabled():
        raise UserError("grouped training cannot use fp16 loss scaling; use amp=false or a bf16 GPU")


def refusal(members: list[Member], settings: TrainSettings) -> str:
    """Why `train_members` would refuse these members ('' when it would not), so that a grid can
    train them one by one instead; a lone member gains nothing from a group."""
    if len(members) < 2:
        return "a single member"
    try:
        check_members([member.model for member in members])
        check_group(members, members[0].train.images.device, settings.amp)
    except UserError as exc:
        return str(exc)
    return ""


def train_members(members: list[Member], val: Split, settings: TrainSettings, augment: Augment = identity) -> list[TrainResult | DivergenceError]:
    """Train every member for `settings.epochs` epochs as one grouped model; returns, per member, what
    `train_classifier` returns for it alone with `settings` and its seed (or the `DivergenceError` that
    would have stopped it), validated every `eval_every` epochs and after the last. A diverged member
    goes on being computed (its channels cannot leave the group) but is no longer evaluated."""
    device = members[0].train.images.device
    amp = settings.amp
    check_group(members, device, amp)
    model = prepare_model(GroupedClassifier([member.model for member in members]), device, asdict(settings))
    optimizer = make_optimizer(model, settings)
    scheduler = make_scheduler(optimizer, settings)
    trains = [member.train for member in members]
    # each member's batch-norm sample, as its solo run draws it (seeded by its own seed)
    bn_images = stack_channels([statistics_sample(t.images, SAMPLE_IMAGES, m.seed) for t, m in zip(trains, members)])
    per_epoch = steps_per_epoch(len(trains[0]), settings.batch_size)
    val_grouped = Split(val.images.repeat(1, len(members), 1, 1), val.labels)
    val_labels = val.labels.cpu().numpy()
    tracks = [MemberTrack() for _ in members]
    epochs = settings.epochs
    for epoch in tqdm(range(1, epochs + 1), desc=f"{len(members)} grouped members", leave=False, unit="epoch"):
        lr = optimizer.param_groups[0]["lr"]
        seeds = [epoch_seed(member.seed, epoch) for member in members]
        losses = train_group_epoch(model, trains, optimizer, augment, settings.batch_size, seeds, amp)
        scheduler.step()
        for track, loss, member in zip(tracks, losses, members):
            if track.error is None and not math.isfinite(loss):
                track.error = DivergenceError(f"training loss became {loss} (epoch {epoch}/{epochs}, seed {member.seed}); lower lr or check the data")
        if epoch % settings.eval_every and epoch < epochs:
            continue
        if running_averages_stale(epoch * per_epoch):
            recompute_bn_statistics(model, bn_images, settings.eval_batch_size, amp)
        logits = predict_logits(model, val_grouped, settings.eval_batch_size, amp)
        for index, (track, loss) in enumerate(zip(tracks, losses)):
            if track.error is None:
                row = {"epoch": epoch, "train_loss": float(loss), "lr": lr, **epoch_metrics(logits[:, index], val_labels, settings.ece_bins)}
                track.record(row, lambda index=index: model.member_state(index))
    return [track.result() for track in tracks]
