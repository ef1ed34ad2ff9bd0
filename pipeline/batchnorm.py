"""Batch-norm statistics recomputed for evaluation (PreciseBN, Wu & Johnson 2021).

A batch-norm layer evaluates with running averages (momentum 0.1) that lag the weights. With a few
optimizer steps per epoch (1–10% of the labels: one step per epoch; BreastMNIST SSL: two) the
averages still carry their initial values and earlier epochs' weights, and every evaluation with
them is skewed (README, "Design choices", has the measured effect). So before a model is evaluated
its running statistics are recomputed over the un-augmented training images with the current
weights; training itself, which normalises with batch statistics, is unchanged.

A supervised training pays for that only where it helps (`refresh_for_evaluation`): while it has
made fewer than `STALE_BELOW_STEPS` optimizer steps (after that the running averages evaluate as
well as recomputed ones, `bench/precise_bn_need.py`), over a fixed sample of at most
`SAMPLE_IMAGES` training images.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data import fold_single, to_float
from pipeline.runtime import autocast

# Optimizer steps after which momentum-0.1 averages evaluate as well as recomputed statistics
# (measured about 110 on all of PneumoniaMNIST, 70 at 10% of it, 80 at 2%; docs/speed.md).
STALE_BELOW_STEPS = 150
# Images a supervised recomputation uses at most: one batch, exact over that sample.
SAMPLE_IMAGES = 1024


def statistics_sample(images: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """At most `limit` of `images`, a seeded choice kept in split order: the same run always uses the same ones."""
    if len(images) <= limit:
        return images
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return images[chosen.to(images.device)]


def running_averages_stale(steps: int) -> bool:
    """Whether the running averages can still be stale after `steps` optimizer steps of a training."""
    return steps < STALE_BELOW_STEPS


def refresh_for_evaluation(model: nn.Module, images: torch.Tensor, steps: int, seed: int, batch_size: int = 1024, amp: bool = False) -> bool:
    """Recompute the statistics before an evaluation if the running averages can still be stale (fewer
    than `STALE_BELOW_STEPS` optimizer steps in this training), over a sample of at most
    `SAMPLE_IMAGES` of `images`; returns whether it did."""
    if not running_averages_stale(steps):
        return False
    recompute_bn_statistics(model, statistics_sample(images, SAMPLE_IMAGES, seed), batch_size, amp)
    return True


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, images: torch.Tensor, batch_size: int = 1024, amp: bool = False) -> None:
    """Replace the running mean and variance of the batch-norm layers that train by their averages
    over `images` (uint8 NCHW), one train-mode pass without gradients in batches of `batch_size`,
    each batch weighted by its size: exact in one batch; over several, the mean is exact and the
    variance is the average within-batch variance. A layer counts as training if it is in training
    mode after `model.train()` (a `Classifier` keeps a frozen encoder in eval mode, so its statistics
    stay). Every module's mode is restored afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.train()
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
    seen = 0
    for chunk in fold_single(list(images.split(batch_size))) if layers else ():
        seen += len(chunk)
        for layer in layers:
            layer.momentum = len(chunk) / seen  # running average weighted by batch size
        with autocast(images.device, amp):
            model(to_float(chunk))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    for module, training in modes.items():
        module.training = training
