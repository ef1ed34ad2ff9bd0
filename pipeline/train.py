"""Supervised training of a binary classifier on device-resident splits.

One epoch = one seeded permutation of the training split, batches augmented on the device, loss
accumulated on the device (no host sync per step). Validation runs every epoch, after the
batch-norm statistics are recomputed over the training images where the running averages can still
be stale (`pipeline.batchnorm`); the model with the
best validation AUROC is kept as a detached copy (never an alias of the live weights), and the test
split is only touched by the caller, once, with that model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline import metrics
from pipeline.augment import Augment, identity
from pipeline.batchnorm import refresh_for_evaluation
from pipeline.data import Split, batch_indices, fold_single, to_float
from pipeline.errors import DivergenceError, UserError
from pipeline.runtime import autocast, epoch_seed, grad_scaler

EpochCallback = Callable[[int, dict[str, float], Callable[[], dict[str, Any]]], None]


@dataclass
class TrainResult:
    """What a finished training returns: the selected weights and the per-epoch history."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class TrainSettings:
    """What the supervised loop reads of a stage's config, and nothing else: `TrainSettings.of(cfg)`
    picks these keys out (absent ones keep the defaults below)."""

    epochs: int
    batch_size: int
    seed: int
    lr: float
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "cosine"
    gamma: float = 0.1
    eval_every: int = 1
    eval_batch_size: int = 1024
    ece_bins: int = 10
    amp: bool = False
    encoder_lr_scale: float = 1.0  # the encoder trains at lr × this (fine-tuning a pretrained encoder)
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> TrainSettings:
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


def parameter_groups(model: nn.Module, lr: float, scale: float = 1.0) -> list[dict[str, Any]]:
    """Trainable parameters; with a `scale` other than 1, the encoder gets lr × scale (fine-tuning
    a pretrained encoder more gently than its new head)."""
    encoder = getattr(model, "encoder", None)
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None and scale != 1.0 else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    rest = [p for p in trainable if id(p) not in encoder_ids]
    groups = [{"params": rest, "lr": lr}]
    if encoder_ids:
        groups.append({"params": [p for p in trainable if id(p) in encoder_ids], "lr": lr * scale})
    return groups


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (Nesterov momentum)."""
    groups = parameter_groups(model, settings.lr, settings.encoder_lr_scale)
    name, wd = settings.optimizer, settings.weight_decay
    if name == "adam":
        return torch.optim.Adam(groups, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=wd)
    return torch.optim.SGD(groups, momentum=settings.momentum, nesterov=True, weight_decay=wd)


def eval_interval(epochs: int, evaluations: int = 30) -> int:
    """Epochs between validations so that a run validates about `evaluations` times."""
    return max(1, epochs // evaluations)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps of an epoch on `n` images: every batch is a step, a one-image last batch is
    folded into the one before."""
    return max(1, n // batch_size + (n % batch_size > 1))


def epochs_for_steps(steps: int, n: int, batch_size: int) -> int:
    """Epochs that give at least `steps` optimizer steps on `n` images, so a small label fraction is
    not starved: at 1% of BreastMNIST an epoch is a single step."""
    return max(1, math.ceil(steps / steps_per_epoch(n, batch_size)))


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: cosine to zero, MedMNIST's multistep (×gamma at 50% and 75%), or constant."""
    epochs = settings.epochs
    if settings.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if settings.scheduler == "multistep":
        milestones = [int(0.5 * epochs), int(0.75 * epochs)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=settings.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def check_resume_state(model: nn.Module, settings: TrainSettings, state: Mapping[str, Any], source: str) -> None:
    """Load a saved optimizer and scheduler state into fresh ones, so that a damaged `last.pt` is
    refused with one line before its run is reopened (a failure mid-run would turn KILLED into FAILED)."""
    optimizer = make_optimizer(model, settings)
    try:
        optimizer.load_state_dict(state["optimizer"])
        make_scheduler(optimizer, settings).load_state_dict(state["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise UserError(
            f"{source} holds an optimizer or scheduler state this run cannot continue from ({type(exc).__name__}: {str(exc)[:120]}); start a new run instead"
        ) from None


@torch.inference_mode()
def predict_logits(model: nn.Module, split: Split, batch_size: int = 1024, amp: bool = False) -> np.ndarray:
    """Logits of a whole split in large batches, in eval mode; returns float64 numpy."""
    was_training = model.training
    model.eval()
    outputs = []
    for chunk in split.images.split(batch_size):
        with autocast(split.images.device, amp):
            outputs.append(model(to_float(chunk)).float())
    model.train(was_training)
    return torch.cat(outputs).cpu().double().numpy()


def epoch_metrics(logits: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, float]:
    """The per-epoch validation metrics: loss, accuracy, AUROC and ECE."""
    probs = metrics.sigmoid(logits)
    return {
        "val_loss": metrics.nll_from_logits(logits, labels),
        "val_acc": float(np.mean((probs >= 0.5) == labels)),
        "val_auroc": metrics.auroc(logits, labels),
        "val_ece": metrics.ece(probs, labels, n_bins),
    }


def selection_score(row: Mapping[str, float]) -> float:
    """What model selection maximises: validation AUROC, or minus the validation loss where the AUROC
    is undefined (one class in the validation split)."""
    return row["val_auroc"] if math.isfinite(row["val_auroc"]) else -row["val_loss"]


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp: bool,
    loss_fn: nn.Module,
) -> torch.Tensor:
    """One optimizer step on a batch of (augmented) images with the mean loss; returns the batch's
    summed loss (`loss_fn` sums), detached and left on the device so the step waits on nothing."""
    with autocast(images.device, amp):
        logits = model(images)
    loss = loss_fn(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss / len(targets)).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train_epoch(
    model: nn.Module,
    train: Split,
    optimizer: torch.optim.Optimizer,
    augment: Augment,
    batch_size: int,
    seed: int,
    amp: bool,
    description: str,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One pass over the training split; returns the mean training loss. `scaler` (fp16 autocast)
    scales the loss before backward and unscales the gradients before the step."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    device = train.images.device
    torch.manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed)
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    total = torch.zeros((), device=device)
    model.train()
    batches = fold_single(list(batch_indices(len(train), batch_size, order_gen, device)))
    for index in tqdm(batches, desc=description, leave=False, unit="batch"):
        images = augment(to_float(train.images[index]), aug_gen)
        total += train_step(model, images, train.labels[index].float(), optimizer, scaler, amp, loss_fn)
    mean_loss = total.item() / len(train)
    if not math.isfinite(mean_loss):
        raise DivergenceError(f"training loss became {mean_loss} ({description}); lower lr or check the data")
    return mean_loss


def train_classifier(
    model: nn.Module,
    train: Split,
    val: Split,
    settings: TrainSettings,
    augment: Augment = identity,
    on_epoch: EpochCallback | None = None,
    resume: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train for `settings.epochs` epochs and keep the weights of the best validation AUROC, evaluated
    every `eval_every` epochs (and after the last): a step-budgeted run on a 1% subset has hundreds
    of one-step epochs, and validating each would cost more than training.

    `on_epoch(epoch, metrics, state)` is called after each epoch; `state()` builds the resumable
    training state (weights, optimizer, scheduler, best so far, history) only when asked for.
    `resume` is such a state: training continues after its epoch with identical results.
    """
    optimizer = make_optimizer(model, settings)
    scheduler = make_scheduler(optimizer, settings)
    amp = settings.amp
    scaler = grad_scaler(train.images.device, amp)
    best_state, best_epoch, best_auroc, history, start = None, 0, -math.inf, [], 1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        best_state, best_epoch, best_auroc = resume["best_state"], resume["best_epoch"], resume["best_auroc"]
        history, start = list(resume["history"]), resume["epoch"] + 1
    val_labels = val.labels.cpu().numpy()
    per_epoch = steps_per_epoch(len(train), settings.batch_size)
    for epoch in range(start, settings.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_epoch(
            model,
            train,
            optimizer,
            augment,
            settings.batch_size,
            epoch_seed(settings.seed, epoch),
            amp,
            f"epoch {epoch}/{settings.epochs}",
            scaler,
        )
        scheduler.step()
        if epoch % settings.eval_every and epoch < settings.epochs:
            continue
        refresh_for_evaluation(model, train.images, epoch * per_epoch, settings.seed, settings.eval_batch_size, amp)
        logits = predict_logits(model, val, settings.eval_batch_size, amp)
        row = {"epoch": epoch, "train_loss": train_loss, "lr": lr, **epoch_metrics(logits, val_labels, settings.ece_bins)}
        history.append(row)
        score = selection_score(row)
        if score > best_auroc:
            best_auroc, best_epoch = score, epoch
            best_state = copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
        tqdm.write(
            f"epoch {epoch:>3}/{settings.epochs}  train_loss {train_loss:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_acc {row['val_acc']:.3f}  val_auroc {row['val_auroc']:.3f}" + ("  *" if best_epoch == epoch else "")
        )
        if on_epoch is not None:

            def state(epoch: int = epoch) -> dict[str, Any]:
                return {
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "best_state": best_state,
                    "best_epoch": best_epoch,
                    "best_auroc": best_auroc,
                    "history": history,
                }

            on_epoch(epoch, row, state)
    return TrainResult(best_state=best_state, best_epoch=best_epoch, history=history)
