"""The SSL pretraining loop: two augmented views per image, batched on the device, labels unused.

The budget is a number of optimizer steps (`steps`, or `epochs` × steps per epoch when given): on
BreastMNIST's 546 images an epoch is only two steps at batch 256, so epochs say little about how
long an encoder trained. The learning rate warms up linearly over `warmup_steps`, then decays on a
cosine to zero at the last step. Every `knn_every` steps, and at step 0 (the random
initialisation), the encoder's batch-norm statistics are recomputed over the training images and the
kNN monitor runs. Shuffling and augmentation depend on (seed, epoch) only, so a run resumed from
`last.pt`, even mid-epoch, continues exactly as if never stopped.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.augment import two_views
from pipeline.batchnorm import recompute_bn_statistics
from pipeline.data import DatasetSplits, batch_indices, to_float
from pipeline.errors import DivergenceError, UserError
from pipeline.features import knn_monitor
from pipeline.runtime import autocast, epoch_seed, grad_scaler

MonitorCallback = Callable[[int, dict[str, float], Callable[[], dict[str, Any]]], None]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(n: int, batch_size: int, seed: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """A seeded permutation cut into batches on `device`; a short last batch is dropped (BN needs full batches)."""
    batches = list(batch_indices(n, batch_size, torch.Generator().manual_seed(seed), device))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch under `epoch_batches`' rule."""
    return max(1, n // batch_size) if n > batch_size else 1


@dataclass(frozen=True)
class PretrainSettings:
    """What the pretraining loop reads of the `ssl_pretrain` config, and nothing else:
    `PretrainSettings.of(cfg)` picks these keys out."""

    steps: int
    epochs: int  # when > 0, replaces `steps`: that many epochs of the training images
    batch_size: int
    seed: int
    lr: float
    weight_decay: float
    warmup_steps: int
    knn_every: int
    knn_k: int
    eval_batch_size: int
    amp: bool

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> PretrainSettings:
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})

    def total_steps(self, n: int) -> int:
        """The run's optimizer-step budget: `epochs` converted at `n` images when given (> 0), else `steps`."""
        return int(self.epochs) * steps_per_epoch(n, self.batch_size) if self.epochs else int(self.steps)


def epoch_views(images: torch.Tensor, settings: PretrainSettings, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(indices, view 1, view 2) of each batch of an epoch, shuffled and augmented from (seed, epoch) alone."""
    seed = epoch_seed(settings.seed, epoch)
    torch.manual_seed(seed)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    for index in epoch_batches(len(images), settings.batch_size, seed, images.device):
        yield index, *two_views(to_float(images[index]), generator)


def monitor(module: nn.Module, data: DatasetSplits, settings: PretrainSettings) -> dict[str, float]:
    """kNN validation AUROC/accuracy of the backbone, its batch-norm statistics recomputed first."""
    recompute_bn_statistics(module.backbone, data.train.images, settings.eval_batch_size, settings.amp)
    return knn_monitor(module.backbone, data.train, data.val, settings.knn_k, settings.eval_batch_size, settings.amp)


class StepTrainer:
    """The optimizer, schedule and loss scaling of one pretraining run, advanced one batch at a time."""

    def __init__(self, module: nn.Module, settings: PretrainSettings, steps: int, device: torch.device):
        params = [p for p in module.parameters() if p.requires_grad]
        self.module = module
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, settings.warmup_steps, steps)
        self.scaler = grad_scaler(device, settings.amp)
        self.amp = settings.amp

    def step(self, view1: torch.Tensor, view2: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch of two views; returns the detached loss."""
        with autocast(view1.device, self.amp):
            loss = self.module(view1, view2, index)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach().float()

    def state(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def check_resume_state(module: nn.Module, settings: PretrainSettings, n_images: int, state: Mapping[str, Any], source: str) -> None:
    """Load a saved training state into a copy of `module` and a fresh optimizer, so a damaged
    `last.pt` is refused with one line before its run is reopened."""
    trainer = StepTrainer(copy.deepcopy(module), settings, settings.total_steps(n_images), next(module.parameters()).device)
    try:
        trainer.load(state)
        int(state["step"]), list(state["history"])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise UserError(f"{source} holds a training state this run cannot continue from ({type(exc).__name__}: {str(exc)[:120]}); start a new run instead") from None


def pretrain(
    module: nn.Module,
    data: DatasetSplits,
    settings: PretrainSettings,
    on_monitor: MonitorCallback | None = None,
    resume: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Train for the step budget with a kNN monitor at step 0 and every `knn_every` steps; returns
    the monitor history (rows of step, epoch, ssl_loss, lr, knn_val_auroc, knn_val_acc).

    `on_monitor(step, row, state)` may call `state()` for the resumable training state. The loss of
    a row is the mean over the steps since the previous row (NaN at step 0).
    """
    images = data.train.images
    device = images.device
    steps = settings.total_steps(len(images))
    per_epoch = steps_per_epoch(len(images), settings.batch_size)
    trainer = StepTrainer(module, settings, steps, device)
    history: list[dict[str, float]] = []
    step = 0

    def report(row: dict[str, float]) -> None:
        history.append(row)
        if on_monitor is not None:
            on_monitor(row["step"], row, lambda: {**trainer.state(), "step": row["step"], "history": list(history)})

    if resume is not None:
        trainer.load(resume)
        history, step = list(resume["history"]), int(resume["step"])
    else:
        module.train()
        report({"step": 0, "epoch": 0, "ssl_loss": math.nan, "lr": 0.0, **monitor(module, data, settings)})
    losses: list[torch.Tensor] = []
    progress = tqdm(total=steps, initial=step, desc="ssl steps", leave=False, unit="step")
    while step < steps:
        epoch = step // per_epoch + 1
        skip = step % per_epoch  # a resumed run replays this epoch's augmentation draws up to its step
        module.train()
        for k, (index, view1, view2) in enumerate(epoch_views(images, settings, epoch)):
            if k < skip:
                continue
            lr = trainer.optimizer.param_groups[0]["lr"]
            losses.append(trainer.step(view1, view2, index))
            step += 1
            progress.update(1)
            if step % settings.knn_every == 0 or step == steps:
                loss = torch.stack(losses).mean().item()
                losses = []
                if not math.isfinite(loss):
                    raise DivergenceError(f"SSL loss became {loss} by step {step}; lower lr or raise temperature")
                row = {"step": step, "epoch": epoch, "ssl_loss": loss, "lr": lr, **monitor(module, data, settings)}
                tqdm.write(f"ssl step {step:>5}/{steps}  loss {loss:.4f}  kNN val AUROC {row['knn_val_auroc']:.3f}  acc {row['knn_val_acc']:.3f}")
                report(row)
                module.train()
            if step >= steps:
                break
    progress.close()
    return history
