"""The SSL pretraining loop: two augmented views per image, batched on the device, labels unused.

Per-step learning rate: linear warm-up, then cosine decay. Before each kNN monitor (and so in the
saved encoder) the encoder's batch-norm statistics are recomputed over the training images.
Shuffling, augmentation and dropout depend on (seed, epoch) only, so a run resumed from `last.pt`
continues as if never stopped.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.augment import two_views
from pipeline.batchnorm import recompute_bn_statistics
from pipeline.data import DatasetSplits, batch_indices, to_float
from pipeline.errors import DivergenceError
from pipeline.features import knn_monitor
from pipeline.runtime import autocast, epoch_seed, grad_scaler

EpochCallback = Callable[[int, dict[str, float], Callable[[], dict[str, Any]]], None]


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


def pretrain_epoch(
    module: nn.Module, data: DatasetSplits, optimizer, scheduler, cfg: Mapping[str, Any], epoch: int,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One epoch of contrastive training; returns the mean loss over steps. `scaler`: loss scaling
    for fp16 autocast."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    seed = epoch_seed(cfg["seed"], epoch)
    torch.manual_seed(seed)
    images = data.train.images
    device = images.device
    generator = torch.Generator(device=device).manual_seed(seed)
    total = torch.zeros((), device=device)
    batches = epoch_batches(len(data.train), cfg["batch_size"], seed, device)
    module.train()
    for index in tqdm(batches, desc=f"ssl epoch {epoch}/{cfg['epochs']}", leave=False, unit="batch"):
        view1, view2 = two_views(to_float(images[index]), generator)
        with autocast(device, cfg["amp"]):
            loss = module(view1, view2, index)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.detach().float()
    mean_loss = total.item() / len(batches)
    if not math.isfinite(mean_loss):
        raise DivergenceError(f"SSL loss became {mean_loss} in epoch {epoch}; lower lr or raise temperature")
    return mean_loss


def pretrain(
    module: nn.Module,
    data: DatasetSplits,
    cfg: Mapping[str, Any],
    on_epoch: EpochCallback | None = None,
    resume: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Run cfg['epochs'] epochs of SSL with a per-epoch kNN monitor; returns the history.

    `on_epoch(epoch, row, state)` may call `state()` for the resumable training state.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    per_epoch = steps_per_epoch(len(data.train), cfg["batch_size"])
    scheduler = warmup_cosine(optimizer, cfg["warmup_epochs"] * per_epoch, cfg["epochs"] * per_epoch)
    scaler = grad_scaler(data.train.images.device, cfg["amp"])
    history: list[dict[str, float]] = []
    start = 1
    if resume is not None:
        module.load_state_dict(resume["module"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        history, start = list(resume["history"]), resume["epoch"] + 1
    for epoch in range(start, cfg["epochs"] + 1):
        lr = optimizer.param_groups[0]["lr"]
        loss = pretrain_epoch(module, data, optimizer, scheduler, cfg, epoch, scaler)
        row = {"epoch": epoch, "ssl_loss": loss, "lr": lr}
        recompute_bn_statistics(module.backbone, data.train.images, cfg["eval_batch_size"], cfg["amp"])
        row.update(knn_monitor(module.backbone, data.train, data.val, cfg["knn_k"], cfg["eval_batch_size"], cfg["amp"]))
        history.append(row)
        tqdm.write(
            f"ssl epoch {epoch:>3}/{cfg['epochs']}  loss {loss:.4f}  kNN val AUROC {row['knn_val_auroc']:.3f}  "
            f"acc {row['knn_val_acc']:.3f}"
        )
        if on_epoch is not None:
            def state(epoch: int = epoch) -> dict[str, Any]:
                return {
                    "epoch": epoch,
                    "module": module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "history": history,
                }

            on_epoch(epoch, row, state)
    return history
