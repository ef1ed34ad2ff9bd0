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
from dataclasses import dataclass, field
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


def parameter_groups(model: nn.Module, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Trainable parameters; with `encoder_lr_scale` in the config, the encoder gets lr × scale
    (fine-tuning a pretrained encoder more gently than its new head)."""
    scale = cfg.get("encoder_lr_scale", 1.0)
    encoder = getattr(model, "encoder", None)
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None and scale != 1.0 else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    rest = [p for p in trainable if id(p) not in encoder_ids]
    groups = [{"params": rest, "lr": cfg["lr"]}]
    if encoder_ids:
        groups.append({"params": [p for p in trainable if id(p) in encoder_ids], "lr": cfg["lr"] * scale})
    return groups


def make_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (Nesterov momentum) from the config."""
    groups = parameter_groups(model, cfg)
    name, wd = cfg["optimizer"], cfg["weight_decay"]
    if name == "adam":
        return torch.optim.Adam(groups, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=wd)
    return torch.optim.SGD(groups, momentum=cfg["momentum"], nesterov=True, weight_decay=wd)


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


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any]) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: cosine to zero, MedMNIST's multistep (×gamma at 50% and 75%), or constant."""
    epochs = cfg["epochs"]
    if cfg["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg["scheduler"] == "multistep":
        milestones = [int(0.5 * epochs), int(0.75 * epochs)]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg["gamma"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def check_resume_state(model: nn.Module, cfg: Mapping[str, Any], state: Mapping[str, Any], source: str) -> None:
    """Load a saved optimizer and scheduler state into fresh ones, so that a damaged `last.pt` is
    refused with one line before its run is reopened (a failure mid-run would turn KILLED into FAILED)."""
    optimizer = make_optimizer(model, cfg)
    try:
        optimizer.load_state_dict(state["optimizer"])
        make_scheduler(optimizer, cfg).load_state_dict(state["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise UserError(f"{source} holds an optimizer or scheduler state this run cannot continue from "
                        f"({type(exc).__name__}: {str(exc)[:120]}); start a new run instead") from None


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
        targets = train.labels[index].float()
        with autocast(device, amp):
            logits = model(images)
        loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss / len(index)).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach()
    mean_loss = total.item() / len(train)
    if not math.isfinite(mean_loss):
        raise DivergenceError(f"training loss became {mean_loss} ({description}); lower lr or check the data")
    return mean_loss


def train_classifier(
    model: nn.Module,
    train: Split,
    val: Split,
    cfg: Mapping[str, Any],
    augment: Augment = identity,
    on_epoch: EpochCallback | None = None,
    resume: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train for cfg['epochs'] epochs and keep the weights of the best validation AUROC, evaluated
    every `eval_every` epochs (and after the last): a step-budgeted run on a 1% subset has hundreds
    of one-step epochs, and validating each would cost more than training.

    `on_epoch(epoch, metrics, state)` is called after each epoch; `state()` builds the resumable
    training state (weights, optimizer, scheduler, best so far, history) only when asked for.
    `resume` is such a state: training continues after its epoch with identical results.
    """
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    amp = bool(cfg.get("amp", False))
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
    per_epoch = steps_per_epoch(len(train), cfg["batch_size"])
    for epoch in range(start, cfg["epochs"] + 1):
        lr = optimizer.param_groups[0]["lr"]
        train_loss = train_epoch(
            model, train, optimizer, augment, cfg["batch_size"], epoch_seed(cfg["seed"], epoch), amp,
            f"epoch {epoch}/{cfg['epochs']}", scaler,
        )
        scheduler.step()
        if epoch % cfg.get("eval_every", 1) and epoch < cfg["epochs"]:
            continue
        refresh_for_evaluation(model, train.images, epoch * per_epoch, cfg["seed"], cfg["eval_batch_size"], amp)
        logits = predict_logits(model, val, cfg["eval_batch_size"], amp)
        row = {"epoch": epoch, "train_loss": train_loss, "lr": lr, **epoch_metrics(logits, val_labels, cfg["ece_bins"])}
        history.append(row)
        score = selection_score(row)
        if score > best_auroc:
            best_auroc, best_epoch = score, epoch
            best_state = copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
        tqdm.write(
            f"epoch {epoch:>3}/{cfg['epochs']}  train_loss {train_loss:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_acc {row['val_acc']:.3f}  val_auroc {row['val_auroc']:.3f}"
            + ("  *" if best_epoch == epoch else "")
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
