"""What a grid's child runs report and how they read back: the result keys, method labels, result
rows from run records, the ablation summary and the label-efficiency figure."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import matplotlib.pyplot as plt
import numpy as np

from pipeline.config import config_hash
from pipeline.records import RunRecord, final_metrics


METHOD_LABELS = {
    "ssl_probe": "SSL linear probe",
    "supervised": "supervised only",
    "imagenet_probe": "ImageNet probe",
    "ssl_finetune": "SSL fine-tune",
    "random_probe": "random-encoder probe (control)",
    "majority_class": "majority class (control)",
}


RESULT_KEYS = ("test_acc", "test_balanced_acc", "test_auroc", "test_ece", "val_auroc")


PAIRED_COLUMNS = ["a", "b", "label_fraction", "metric", "n", "seeds", "a_mean", "b_mean", "diff_mean", "ci_low", "ci_high", "verdict"]


TABLE_KEYS = ("test_acc", "test_auroc", "test_ece")


SHOWN_KEYS = ("test_acc", "test_balanced_acc", "test_auroc", "test_ece")  # the columns of the week-5/6 tables


OPTIONAL_KEYS = ("test_balanced_acc", "val_auroc")  # absent from runs logged before they existed: NaN


# Config keys that do not change what a baseline learns (or are columns of the table themselves).
NOT_RECIPE = {
    "seed",
    "label_fraction",
    "dataset",
    "device",
    "amp",
    "channels_last",
    "compile",
    "checkpoint_every",
    "checkpoint_min_seconds",
    "eval_batch_size",
    "bootstrap",
    "ece_bins",
}


ABLATION_METRICS = ("val_auroc", "val_acc", "test_auroc", "test_acc", "test_ece")


def label_efficiency_figure(summary: list[dict[str, Any]], metric: str, title: str) -> plt.Figure:
    """Label fraction (log scale) vs. a test metric, one line per method with ±1 std error bars."""
    fig, ax = plt.subplots(figsize=(5.6, 4.0), constrained_layout=True)
    methods = list(dict.fromkeys(row["method"] for row in summary))
    for k, method in enumerate(methods):
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["label_fraction"])
        nudge = 1 + 0.06 * (k - (len(methods) - 1) / 2)  # side by side on the log axis, so error bars do not hide each other
        ax.errorbar(
            [r["label_fraction"] * nudge for r in rows],
            [r[f"{metric}_mean"] for r in rows],
            yerr=np.nan_to_num([r[f"{metric}_std"] for r in rows]),
            marker="o",
            capsize=3,
            label=METHOD_LABELS.get(method, method),
        )
    fractions = sorted({r["label_fraction"] for r in summary})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.set_xlabel("fraction of training labels (log scale)")
    ax.set_ylabel(metric.replace("_", " ").replace("auroc", "AUROC").replace("acc", "accuracy"))
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def recipe_hash(run: RunRecord) -> str:
    """A short hash of every logged setting that shapes what a classifier learns (lr, optimizer,
    size, epochs, ...): runs with the same recipe differ only by seed."""
    settings = run.config
    return config_hash({k: v for k, v in settings.items() if k not in NOT_RECIPE})[:6]


def run_rows(runs: list[RunRecord], label: Callable[[RunRecord], str] = lambda run: run.tags.get("method", "?")) -> list[dict[str, Any]]:
    """Result rows (method label, label_fraction, seed, test metrics, run_id) from classifier runs
    (newest first); of runs with the same label, fraction and seed only the newest counts."""
    rows, seen = [], set()
    for run in runs:
        tags, values = run.tags, final_metrics(run)
        key = (label(run), float(tags.get("label_fraction", 1.0)), tags.get("seed"))
        if not all(k in values for k in TABLE_KEYS) or key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "method": key[0],
                "label_fraction": key[1],
                "seed": key[2],
                **{k: values[k] for k in TABLE_KEYS},
                **{k: values.get(k, math.nan) for k in OPTIONAL_KEYS},
                "run_id": run.id,
            }
        )
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
