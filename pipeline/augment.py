"""Batched on-device augmentations with per-sample random parameters, reproducible from a seed.

Each transform takes a float batch N×C×H×W in [0, 1] on any device and a `torch.Generator` on the
same device, draws one set of parameters per sample, and applies them with a few tensor ops (one
`grid_sample` for all geometry, one grouped convolution for blur). Nothing loops over samples in
Python, so an augmented epoch costs about as much as the forward pass of a small model.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pipeline.errors import UserError

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _chance(n: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def identity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """No augmentation."""
    return images


def hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability p."""
    flip = _chance(images.shape[0], p, generator, images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _warp(images: torch.Tensor, theta: torch.Tensor, padding: str) -> torch.Tensor:
    """Resample each image with its own 2×3 affine matrix (normalised coordinates)."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def affine(
    images: torch.Tensor,
    generator: torch.Generator,
    degrees: float = 10.0,
    translate: float = 0.08,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Small random rotation (±degrees), translation (± fraction of size) and zoom per image; what
    comes into the frame is black, as with torchvision's RandomAffine (fill 0)."""
    n, device = images.shape[0], images.device
    angle = torch.deg2rad(_uniform(n, -degrees, degrees, generator, device))
    zoom = _uniform(n, scale[0], scale[1], generator, device)
    shift = _uniform(2 * n, -2 * translate, 2 * translate, generator, device).view(n, 2)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    return _warp(images, theta, "zeros")


CROP_TRIES = 10


def crop_sizes(n: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and height (fractions of the frame) of n random crops, drawn as torchvision's
    RandomResizedCrop draws them: up to 10 (area, log-uniform aspect) tries per crop, the first that
    fits the frame is taken, the whole frame when none does (square images, a ratio range around 1)."""
    area = _uniform(n * CROP_TRIES, scale[0], scale[1], generator, device).view(n, CROP_TRIES)
    aspect = torch.exp(_uniform(n * CROP_TRIES, math.log(ratio[0]), math.log(ratio[1]), generator, device)).view(n, CROP_TRIES)
    widths, heights = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (widths <= 1) & (heights <= 1)
    first = fits.int().argmax(dim=1, keepdim=True)
    found, whole = fits.any(dim=1), torch.ones(n, device=device)
    return (torch.where(found, widths.gather(1, first).squeeze(1), whole), torch.where(found, heights.gather(1, first).squeeze(1), whole))


def random_resized_crop(
    images: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Crop a random area fraction `scale` with aspect `ratio` (see `crop_sizes`) at a random place
    in the frame and resize it back, per image."""
    n, device = images.shape[0], images.device
    width, height = crop_sizes(n, scale, ratio, generator, device)
    cx = (1 - width) * _uniform(n, -1, 1, generator, device)
    cy = (1 - height) * _uniform(n, -1, 1, generator, device)
    zeros = torch.zeros_like(width)
    theta = torch.stack([torch.stack([width, zeros, cx], 1), torch.stack([zeros, height, cy], 1)], 1)
    return _warp(images, theta, "border")  # the crop lies in the frame: border only settles its edge pixels


def color_jitter(images: torch.Tensor, generator: torch.Generator, brightness: float = 0.2, contrast: float = 0.2, p: float = 0.8) -> torch.Tensor:
    """Multiply brightness by 1±b and scale contrast about each image's mean by 1±c (prob. p)."""
    n, device = images.shape[0], images.device
    apply = _chance(n, p, generator, device)[:, None, None, None]
    gain = _uniform(n, 1 - brightness, 1 + brightness, generator, device)[:, None, None, None]
    spread = _uniform(n, 1 - contrast, 1 + contrast, generator, device)[:, None, None, None]
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    jittered = ((images * gain - mean * gain) * spread + mean * gain).clamp(0, 1)
    return torch.where(apply, jittered, images)


def gaussian_blur(images: torch.Tensor, generator: torch.Generator, sigma: tuple[float, float] = (0.1, 1.5), p: float = 0.5) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma, applied with probability p."""
    n, c, h, w = images.shape
    device = images.device
    sigmas = _uniform(n, sigma[0], sigma[1], generator, device)
    sigmas = torch.where(_chance(n, p, generator, device), sigmas, torch.zeros_like(sigmas))
    radius = max(1, min(int(math.ceil(3 * sigma[1])), (min(h, w) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=images.dtype)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigmas[:, None].clamp(min=1e-6) ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(c, dim=0)
    flat = images.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n * c)
    return flat.view(n, c, h, w)


def gaussian_noise(images: torch.Tensor, generator: torch.Generator, std: tuple[float, float] = (0.0, 0.05), p: float = 0.5) -> torch.Tensor:
    """Add zero-mean Gaussian noise with a per-image std (prob. p), clamped to [0, 1]."""
    n, device = images.shape[0], images.device
    stds = _uniform(n, std[0], std[1], generator, device) * _chance(n, p, generator, device)
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=images.dtype)
    return (images + noise * stds[:, None, None, None]).clamp(0, 1)


def compose(*steps: Augment) -> Augment:
    """Apply augmentations in order."""

    def run(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for step in steps:
            images = step(images, generator)
        return images

    return run


SSL_VIEW = compose(
    random_resized_crop,
    hflip,
    partial(color_jitter, brightness=0.4, contrast=0.4, p=0.8),
    partial(gaussian_blur, p=0.5),
    partial(gaussian_noise, p=0.3),
)

SSL_VIEW_DESCRIPTION = (
    "random_resized_crop(scale 0.4-1, ratio 3/4-4/3) → hflip(p=0.5) → color_jitter(brightness 0.4, "
    "contrast 0.4, p=0.8) → gaussian_blur(sigma 0.1-1.5, p=0.5) → gaussian_noise(std 0-0.05, p=0.3)"
)

PRESETS: dict[str, Augment] = {
    "none": identity,
    "flip": hflip,
    "geometric": compose(hflip, affine),
    "geometric+intensity": compose(hflip, affine, color_jitter, partial(gaussian_blur, p=0.2), partial(gaussian_noise, p=0.2)),
    "crop": compose(partial(random_resized_crop, scale=(0.6, 1.0)), hflip),
    "ssl": SSL_VIEW,
}


def two_views(images: torch.Tensor, generator: torch.Generator, view: Augment = SSL_VIEW) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of the same batch (contrastive SSL)."""
    return view(images, generator), view(images, generator)


def build_augment(preset: str) -> Augment:
    """The augmentation of a named preset."""
    if preset not in PRESETS:
        raise UserError(f"augment={preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
    return PRESETS[preset]


def preset_names() -> Sequence[str]:
    """The preset names, in a stable order (the ablation's default variants come from here)."""
    return tuple(PRESETS)
