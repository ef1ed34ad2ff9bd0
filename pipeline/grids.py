"""The grids that steps run as a parent run with child runs.

Label efficiency (`linear_probe`, `ssl_finetune`): fractions × subset seeds × methods, the same
stratified subset for every method of a (fraction, seed), the pretraining runs it uses and which one
serves which subset seed, and the majority-class control. What the children report and how their
rows read back lives in `pipeline.results`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import numpy as np

from pipeline import tracking
from pipeline.data import DatasetSplits, stratified_subset
from pipeline.errors import PipelineError, UserError
from pipeline.results import RESULT_KEYS

T = TypeVar("T")
GRID_GUIDE = (
    "\n\nEach child run (expand this row) is one classifier with its own predictions, reliability and confusion "
    "plots and checkpoint; this run holds the tables and figures above, and its MLflow model is the child "
    "with the best validation AUROC (tag `selected_run_id`).\n"
)


def load_encoder_checkpoint(ssl_run_id: str, dataset: str) -> tuple[Path, Any]:
    """Download the encoder of an ssl_pretrain run (`latest` = newest FINISHED); returns (path, run)."""
    run = tracking.find_run("ssl_pretrain", dataset, ssl_run_id)
    return tracking.download_artifact(run.id, "checkpoints/encoder.pt"), run


def ssl_run_ids(value: str) -> list[str]:
    """The pretraining runs a grid uses: one id, `latest`, or several separated by commas or spaces."""
    ids = value.replace(",", " ").split()
    if not ids:
        raise UserError("ssl_run_id is empty; give an ssl_pretrain run id, several separated by commas, or latest")
    return ids


def for_seed(encoders: list[T], seeds: list[int], seed: int) -> T:
    """The pretraining run (or its encoder) that serves a subset seed: number i of `seeds` takes
    encoder i mod K, so K pretraining runs are crossed with the subset seeds in turn."""
    return encoders[list(seeds).index(seed) % len(encoders)]


def pretraining_seed_note(seeds: list[int], runs: list[Any]) -> str:
    """Which pretraining run serves which subset seed, as the tables state it."""
    pairs = [
        f"subset seed {seed} → encoder {for_seed(runs, seeds, seed).id[:8]} (pretraining seed {for_seed(runs, seeds, seed).tags.get('seed', '?')})" for seed in seeds
    ]
    return f"{len(runs)} pretraining run(s) for {len(seeds)} subset seeds: " + "; ".join(pairs) + "."


def majority_rows(data: DatasetSplits, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The majority-class control per (fraction, seed): always predict the subset's most common
    label. Its AUROC is 0.5 and its balanced accuracy 0.5 by construction; no run is logged."""
    train_labels = data.train.labels.cpu().numpy()
    test_labels = data.test.labels.cpu().numpy()
    rows = []
    for fraction in cfg["label_fractions"]:
        for seed in cfg["seeds"]:
            majority = int(np.bincount(train_labels[stratified_subset(train_labels, fraction, seed)], minlength=2).argmax())
            rows.append(
                {
                    "method": "majority_class",
                    "label_fraction": fraction,
                    "seed": seed,
                    "run_id": "",
                    "test_acc": float(np.mean(test_labels == majority)),
                    "test_balanced_acc": 0.5,
                    "test_auroc": 0.5,
                    "test_ece": math.nan,
                    "val_auroc": 0.5,
                }
            )
    return rows


def child_failure(name: str, exc: Exception) -> str:
    """One failed child, as the parent's failure names it: `name (ErrorType: first line)`."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{name} ({type(exc).__name__}: {first})"


def raise_failures(failures: list[str], total: int, grid: str) -> None:
    """End a grid's parent FAILED, naming its failed children, after it logged what finished."""
    if failures:
        raise PipelineError(f"{len(failures)} of {total} {grid} child runs failed: {'; '.join(failures)}")


def run_cells(cells: Iterable[tuple[str, T]], child: Callable[[T], Mapping[str, Any]]) -> tuple[list[tuple[T, Mapping[str, Any]]], list[str]]:
    """Every grid's children and its one failure policy: call `child(cell)` for each (name, cell);
    a child that fails (its run already FAILED with the reason) is recorded by name and the grid goes
    on, so one diverging seed does not cost the others; a user mistake stops it at once, since every
    child would repeat it. Returns ((cell, child's values) of the finished children, failures)."""
    done, failures = [], []
    for name, cell in cells:
        try:
            done.append((cell, child(cell)))
        except UserError:
            raise
        except Exception as exc:
            failures.append(child_failure(name, exc))
    return done, failures


def run_grid(
    cfg: Mapping[str, Any],
    data: DatasetSplits,
    child: Callable[[np.ndarray, dict[str, Any]], Mapping[str, float]],
    methods: list[str],
    base_tags: Mapping[str, Any],
    ahead: Callable[[float, dict[int, np.ndarray]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Call `child(subset, tags)` (returning metrics and its `run_id`) for every fraction × seed ×
    method; the same stratified subset serves every method of a (fraction, seed). `ahead(fraction,
    {seed: subset})`, when given, runs before a fraction's children, so a step can train that
    fraction's members together and let each child log its stored result (a member's failure is
    stored too and raised by its child; an error of `ahead` itself stops the grid). Children run
    under `run_cells`' failure policy. Returns (rows of the finished children, failures)."""
    train_labels = data.train.labels.cpu().numpy()
    rows, failures = [], []
    for fraction in cfg["label_fractions"]:
        subsets = {seed: stratified_subset(train_labels, fraction, seed) for seed in cfg["seeds"]}
        if ahead is not None:
            ahead(fraction, subsets)
        cells = [(f"{method}-f{fraction:g}-s{seed}", {**base_tags, "method": method, "label_fraction": fraction, "seed": seed}) for seed in subsets for method in methods]
        done, failed = run_cells(cells, lambda tags: child(subsets[tags["seed"]], tags))
        rows += [{**tags, **{k: values[k] for k in RESULT_KEYS}, "run_id": values["run_id"]} for tags, values in done]
        failures += failed
    return rows, failures
