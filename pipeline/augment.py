"""Batched on-device augmentations: every sample gets its own random parameters from a seeded
generator, so an augmented epoch is one tensor op per transform instead of per-sample Python."""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.errors import UserError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def identity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """No augmentation."""
    return images


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability p."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


PRESETS: dict[str, Augment] = {
    "none": identity,
    "flip": random_hflip,
}


def build_augment(preset: str) -> Augment:
    """The augmentation of a named preset."""
    if preset not in PRESETS:
        raise UserError(f"augment={preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
    return PRESETS[preset]
