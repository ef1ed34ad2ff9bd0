"""The grids that steps run as a parent run with child runs, and that `compare` reads back.

Label efficiency (`linear_probe`, `ssl_finetune`): fractions × subset seeds × methods, the same
stratified subset for every method of a (fraction, seed), the pretraining runs it uses and which one
serves which subset seed, the majority-class control, and result rows read from child runs. The
augmentation ablation (`augment_ablation`): per-variant summaries over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import matplotlib.pyplot as plt
import numpy as np

from pipeline import config, tracking
from pipeline.data import DatasetSplits, stratified_subset
from pipeline.errors import PipelineError, UserError
from pipeline.tracking import RunRecord

METHOD_LABELS = {"ssl_probe": "SSL linear probe", "supervised": "supervised only", "imagenet_probe": "ImageNet probe",
                 "ssl_finetune": "SSL fine-tune", "random_probe": "random-encoder probe (control)",
                 "majority_class": "majority class (control)"}
RESULT_KEYS = ("test_acc", "test_balanced_acc", "test_auroc", "test_ece", "val_auroc")
T = TypeVar("T")
PAIRED_COLUMNS = ["a", "b", "label_fraction", "metric", "n", "seeds", "a_mean", "b_mean", "diff_mean", "ci_low", "ci_high", "verdict"]
TABLE_KEYS = ("test_acc", "test_auroc", "test_ece")
SHOWN_KEYS = ("test_acc", "test_balanced_acc", "test_auroc", "test_ece")  # the columns of the week-5/6 tables
OPTIONAL_KEYS = ("test_balanced_acc", "val_auroc")  # absent from runs logged before they existed: NaN
# Config keys that do not change what a baseline learns (or are columns of the table themselves).
NOT_RECIPE = {"seed", "label_fraction", "dataset", "device", "amp", "channels_last", "compile", "checkpoint_every",
              "checkpoint_min_seconds", "eval_batch_size", "bootstrap", "ece_bins"}
GRID_GUIDE = ("\n\nEach child run (expand this row) is one classifier with its own predictions, reliability and confusion "
              "plots and checkpoint; this run holds the tables and figures above, and its MLflow model is the child "
              "with the best validation AUROC (tag `selected_run_id`).\n")
ABLATION_METRICS = ("val_auroc", "val_acc", "test_auroc", "test_acc", "test_ece")


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
    pairs = [f"subset seed {seed} → encoder {for_seed(runs, seeds, seed).id[:8]} "
             f"(pretraining seed {for_seed(runs, seeds, seed).tags.get('seed', '?')})" for seed in seeds]
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
            rows.append({"method": "majority_class", "label_fraction": fraction, "seed": seed, "run_id": "",
                         "test_acc": float(np.mean(test_labels == majority)), "test_balanced_acc": 0.5, "test_auroc": 0.5,
                         "test_ece": math.nan, "val_auroc": 0.5})
    return rows


def label_efficiency_figure(summary: list[dict[str, Any]], metric: str, title: str) -> plt.Figure:
    """Label fraction (log scale) vs. a test metric, one line per method with ±1 std error bars."""
    fig, ax = plt.subplots(figsize=(5.6, 4.0), constrained_layout=True)
    methods = list(dict.fromkeys(row["method"] for row in summary))
    for k, method in enumerate(methods):
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["label_fraction"])
        nudge = 1 + 0.06 * (k - (len(methods) - 1) / 2)  # side by side on the log axis, so error bars do not hide each other
        ax.errorbar([r["label_fraction"] * nudge for r in rows], [r[f"{metric}_mean"] for r in rows],
                    yerr=np.nan_to_num([r[f"{metric}_std"] for r in rows]), marker="o", capsize=3,
                    label=METHOD_LABELS.get(method, method))
    fractions = sorted({r["label_fraction"] for r in summary})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.set_xlabel("fraction of training labels (log scale)")
    ax.set_ylabel(metric.replace("_", " ").replace("auroc", "AUROC").replace("acc", "accuracy"))
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def child_failure(name: str, exc: Exception) -> str:
    """One failed child, as the parent's failure names it: `name (ErrorType: first line)`."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{name} ({type(exc).__name__}: {first})"


def raise_failures(failures: list[str], total: int, grid: str) -> None:
    """End a grid's parent FAILED, naming its failed children, after it logged what finished."""
    if failures:
        raise PipelineError(f"{len(failures)} of {total} {grid} child runs failed: {'; '.join(failures)}")


def run_grid(
    cfg: Mapping[str, Any], data: DatasetSplits, child: Callable[[np.ndarray, dict[str, Any]], Mapping[str, float]],
    methods: list[str], base_tags: Mapping[str, Any], ahead: Callable[[float, dict[int, np.ndarray]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Call `child(subset, tags)` (returning metrics and its `run_id`) for every fraction × seed ×
    method; the same stratified subset serves every method of a (fraction, seed). `ahead(fraction,
    {seed: subset})`, when given, runs before a fraction's children, so a step can train that
    fraction's members together and let each child log its stored result (a member's failure is
    stored too and raised by its child; an error of `ahead` itself stops the grid). Every grid's
    failure policy: a child that fails (its run already FAILED with the reason) is recorded and the
    grid goes on, so one diverging seed does not cost the others; a user mistake stops it at once,
    since every child would repeat it. Returns (rows of the finished children, failures)."""
    train_labels = data.train.labels.cpu().numpy()
    rows, failures = [], []
    for fraction in cfg["label_fractions"]:
        subsets = {seed: stratified_subset(train_labels, fraction, seed) for seed in cfg["seeds"]}
        if ahead is not None:
            ahead(fraction, subsets)
        for seed, subset in subsets.items():
            for method in methods:
                tags = {**base_tags, "method": method, "label_fraction": fraction, "seed": seed}
                try:
                    values = child(subset, tags)
                except UserError:
                    raise
                except Exception as exc:
                    failures.append(child_failure(f"{method}-f{fraction:g}-s{seed}", exc))
                    continue
                rows.append({**tags, **{k: values[k] for k in RESULT_KEYS}, "run_id": values["run_id"]})
    return rows, failures


def recipe_hash(run: RunRecord) -> str:
    """A short hash of every logged setting that shapes what a classifier learns (lr, optimizer,
    size, epochs, ...): runs with the same recipe differ only by seed."""
    settings = run.config
    return config.config_hash({k: v for k, v in settings.items() if k not in NOT_RECIPE})[:6]


def run_rows(runs: list[RunRecord], label: Callable[[RunRecord], str] = lambda run: run.tags.get("method", "?")) -> list[dict[str, Any]]:
    """Result rows (method label, label_fraction, seed, test metrics, run_id) from classifier runs
    (newest first); of runs with the same label, fraction and seed only the newest counts."""
    rows, seen = [], set()
    for run in runs:
        tags, values = run.tags, tracking.final_metrics(run)
        key = (label(run), float(tags.get("label_fraction", 1.0)), tags.get("seed"))
        if not all(k in values for k in TABLE_KEYS) or key in seen:
            continue
        seen.add(key)
        rows.append({"method": key[0], "label_fraction": key[1], "seed": key[2], **{k: values[k] for k in TABLE_KEYS},
                     **{k: values.get(k, math.nan) for k in OPTIONAL_KEYS}, "run_id": run.id})
    return rows


def ablation_summary(rows: list[Mapping[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Per variant (in `variants` order, skipping those without rows): n, and mean, std, values of ABLATION_METRICS.

    std is the sample standard deviation (ddof=1); NaN when n = 1.
    """
    summary = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        entry: dict[str, Any] = {"variant": variant, "n": len(mine)}
        for metric in ABLATION_METRICS:
            values = [float(r[metric]) for r in mine]
            entry[f"{metric}_values"] = values
            entry[f"{metric}_mean"] = float(np.mean(values))
            entry[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        summary.append(entry)
    return summary
