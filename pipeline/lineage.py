"""What a run reads and what a logged model takes: the split datasets MLflow records as run inputs
(the runs table's Dataset column), and the input example of a logged model."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from pipeline import tracking
from pipeline.data import DatasetSplits, Split


def split_input(data: DatasetSplits, split: str, part: Split | None = None, name: str = "") -> tracking.InputData:
    """A split (or `part` of it, a label subset) as a run input named `<dataset>-<split>` (or `name`)."""
    part = data.split(split) if part is None else part
    return tracking.InputData(name or f"{data.name}-{split}", split, data.source, part.images.cpu().numpy(), part.labels.cpu().numpy())


def classifier_inputs(data: DatasetSplits, train: Split, cfg: Mapping[str, Any]) -> list[tracking.InputData]:
    """A classifier run's inputs: its (possibly label-subset) training images, val and test."""
    fraction = float(cfg.get("label_fraction", 1.0))
    name = f"{data.name}-train" if fraction >= 1.0 else f"{data.name}-train-f{fraction:g}-s{cfg['seed']}"
    return [split_input(data, "train", train, name), split_input(data, "val"), split_input(data, "test")]


def model_example(data: DatasetSplits) -> np.ndarray:
    """An input example for a logged model: two validation images as float [0, 1], N×C×H×W."""
    return (data.val.images[:2].float() / 255.0).cpu().numpy()
