"""Exact batch-norm statistics for evaluation (PreciseBN, Wu & Johnson 2021).

A batch-norm layer evaluates with running averages (momentum 0.1) that lag the weights. With a few
optimizer steps per epoch (1–10% of the labels: one step per epoch; BreastMNIST SSL: two) the
averages still carry their initial values and earlier epochs' weights, and every evaluation with
them is skewed (README, "Design choices", has the measured effect). So before a model is evaluated
its running statistics are recomputed over the un-augmented training images with the current
weights; training itself, which normalises with batch statistics, is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data import to_float
from pipeline.runtime import autocast


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, images: torch.Tensor, batch_size: int = 1024, amp: bool = False) -> None:
    """Replace the running mean and variance of every batch-norm layer that trains (frozen,
    eval-mode layers keep theirs) by their average over `images` (uint8 NCHW) in batches of
    `batch_size`, one train-mode pass without gradients; restores the model's mode."""
    was_training = model.training
    model.train()
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
              and m.track_running_stats]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches of this pass
    if layers:
        for chunk in images.split(batch_size):
            with autocast(images.device, amp):
                model(to_float(chunk))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.train(was_training)
