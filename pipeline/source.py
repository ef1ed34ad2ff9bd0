"""The classifier run a week 6–8 step consumes: lookup, its logged predictions, tags and checkpoint.

`calibrate`, `thresholds` and `robustness` never retrain: they read a finished classifier run's
`predictions/{val,test}.csv` (and, for robustness, `checkpoints/best.pt`). Everything that can go
wrong with the source (not found, other dataset, no predictions, malformed file) is checked here,
before the consuming step opens its own run, so a mistake logs nothing.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline import metrics, tracking
from pipeline.data import ArraySplit, load_arrays, resolve_root
from pipeline.errors import UserError
from pipeline.records import RunRecord

PREDICTIONS = ("predictions/val.csv", "predictions/test.csv")
COLUMNS = ["index", "label", "logit", "prob"]


@dataclass(frozen=True)
class Predictions:
    """One split's logged predictions: sample index, 0/1 label and class-1 logit."""

    index: np.ndarray
    labels: np.ndarray
    logits: np.ndarray

    @property
    def probs(self) -> np.ndarray:
        """p(class 1) recomputed from the logits (full precision)."""
        return metrics.sigmoid(self.logits)


@dataclass(frozen=True)
class SourceRun:
    """A classifier run with its validation and test predictions."""

    run: RunRecord
    val: Predictions
    test: Predictions

    @property
    def run_id(self) -> str:
        return self.run.id

    def tags(self) -> dict[str, str]:
        """Tags the consuming run copies: model, seed, label fraction, and where they came from."""
        source = self.run.tags
        copied = {"model": source.get("model", "-"), "seed": source.get("seed", "-"), "source_run_id": self.run_id, "source_stage": source.get("stage", "")}
        if "label_fraction" in source:
            copied["label_fraction"] = source["label_fraction"]
        return copied

    def image_size(self) -> int:
        """The image size the source model was trained at (its logged `cfg.size`, else 28)."""
        return int(self.run.config.get("size", 28))

    def test_arrays(self, data_root: str, size: int) -> ArraySplit:
        """The dataset's test images in prediction order, checked against the run's test labels."""
        arrays = load_arrays(self.run.tags["dataset"], size, resolve_root(data_root))["test"]
        index = self.test.index
        if len(arrays.labels) != len(index) or not np.array_equal(arrays.labels[index], self.test.labels):
            raise UserError(
                f"the test split under {resolve_root(data_root)} does not match run {self.run_id}'s test predictions; point data_root at the data the run was trained on"
            )
        return ArraySplit(arrays.images[index], arrays.labels[index])


def read_predictions(path: Path, name: str) -> Predictions:
    """Parse a predictions CSV (index,label,logit,prob); anything else is a UserError."""
    try:
        table = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64)
    except ValueError as exc:
        raise UserError(f"{name} is not a predictions table ({exc})") from None
    if list(table.dtype.names or ()) != COLUMNS:
        raise UserError(f"{name} must have columns {','.join(COLUMNS)}, got {table.dtype.names}")
    table = np.atleast_1d(table)
    labels = table["label"]
    if len(table) < 2 or not np.isin(labels, (0, 1)).all() or not np.isfinite(table["logit"]).all():
        raise UserError(f"{name} must hold at least two rows with 0/1 labels and finite logits")
    index = table["index"]
    if not np.array_equal(np.sort(index), np.arange(len(index))):
        raise UserError(f"{name}: its index column must number the split's images 0..{len(index) - 1}, each once")
    return Predictions(index.astype(np.int64), labels.astype(np.int64), table["logit"])


def load_source(stages: Sequence[str], dataset: str, run_id: str = "latest", extra: tuple[str, ...] = ()) -> SourceRun:
    """Find the source run (by id or the newest FINISHED one with predictions) and read them."""
    run = tracking.find_run(",".join(stages), dataset, run_id, require=PREDICTIONS + extra)
    with tempfile.TemporaryDirectory(prefix="medmnist-ssl-") as tmp:
        splits = {
            split: read_predictions(tracking.download_artifact(run.id, path, Path(tmp)), f"run {run.id} {path}") for split, path in zip(("val", "test"), PREDICTIONS)
        }
    for split, predictions in splits.items():
        if len(np.unique(predictions.labels)) < 2:
            raise UserError(f"run {run.id} {split} predictions hold a single class; both classes are needed")
    return SourceRun(run, splits["val"], splits["test"])


def best_selected_run(grid_run_ids: Sequence[str]) -> str:
    """Of grid parent runs (e.g. each SSL method's `ssl_finetune`), the selected child (tag
    `selected_run_id`) whose validation AUROC (`selected_best_val_auroc`, never test) is the highest;
    a tie goes to the grid listed first."""
    scored = []
    for run_id in grid_run_ids:
        run = tracking.get_run(run_id)
        auroc = run.metrics.get("selected_best_val_auroc", math.nan)
        if "selected_run_id" in run.tags and not math.isnan(auroc):
            scored.append((auroc, run.tags["selected_run_id"]))
    if not scored:
        raise UserError(f"none of the grid runs {', '.join(grid_run_ids)} selected a child with a validation AUROC (tag selected_run_id, metric selected_best_val_auroc)")
    return max(scored, key=lambda entry: entry[0])[1]
