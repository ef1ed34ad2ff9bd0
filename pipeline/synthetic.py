"""Small synthetic files in medmnist's npz format, with a learnable signal, for tests and demos.

Class 1 images carry a bright disc at a random position and class 0 images a dim ring, both under
noise, so a few epochs of any model separate them while the task is not trivially solved at init.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data import file_name

DEFAULT_COUNTS = {"train": 96, "val": 32, "test": 48}


def synthetic_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 N×size×size images whose pattern depends on the label."""
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy = rng.uniform(0.35, 0.65, n)[:, None, None] * size
    cx = rng.uniform(0.35, 0.65, n)[:, None, None] * size
    radius = rng.uniform(0.15, 0.25, n)[:, None, None] * size
    dist = np.sqrt((yy[None] - cy) ** 2 + (xx[None] - cx) ** 2)
    disc = (dist < radius).astype(np.float32)
    ring = ((dist > radius * 0.8) & (dist < radius * 1.2)).astype(np.float32)
    pattern = np.where(labels[:, None, None] == 1, 0.55 * disc, 0.35 * ring)
    background = rng.uniform(0.15, 0.35, n)[:, None, None]
    noise = rng.normal(0.0, 0.12, (n, size, size))
    images = np.clip(background + pattern + noise, 0.0, 1.0)
    return (images * 255).round().astype(np.uint8)


def write_synthetic(
    root: Path,
    name: str = "breastmnist",
    size: int = 28,
    counts: dict[str, int] | None = None,
    positive_rate: float = 0.7,
    seed: int = 0,
) -> Path:
    """Write `<name>[_size].npz` under `root` with medmnist's keys, dtypes and label shapes."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (counts or DEFAULT_COUNTS).items():
        labels = (rng.random(n) < positive_rate).astype(np.uint8)
        labels[:2] = (0, 1)  # every split holds both classes
        arrays[f"{split}_images"] = synthetic_images(labels, size, rng)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    root.mkdir(parents=True, exist_ok=True)
    path = root / file_name(name, size)
    np.savez_compressed(path, **arrays)
    return path
