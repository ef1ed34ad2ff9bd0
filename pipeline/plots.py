"""Figures as matplotlib Figure objects (headless Agg backend); callers log or save and close them."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.metrics import calibration_bins, ece  # noqa: E402


def reliability_diagram(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 10, title: str = "Reliability", ax_pair=None
) -> Figure:
    """Accuracy vs. mean top-label confidence per equal-width bin, with a bin-count histogram below.

    The title ends with the ECE to three decimals, e.g. `Reliability (test) — ECE = 0.073`.
    """
    bins = calibration_bins(probs, labels, n_bins, "uniform")
    value = ece(probs, labels, n_bins, "uniform")
    if ax_pair is None:
        fig, (top, bottom) = plt.subplots(
            2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
        )
    else:
        top, bottom = ax_pair
        fig = top.figure
    width = 1.0 / n_bins
    centers = (bins.lower + bins.upper) / 2
    filled = bins.count > 0
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.bar(centers[filled], bins.accuracy[filled], width=width * 0.9, color="tab:blue", edgecolor="black",
            label="accuracy per bin")
    top.bar(centers[filled], bins.confidence[filled] - bins.accuracy[filled], bottom=bins.accuracy[filled],
            width=width * 0.9, facecolor="none", edgecolor="tab:red", hatch="//", label="gap to confidence")
    top.plot(centers[filled], bins.confidence[filled], "_", color="black", markersize=18, markeredgewidth=2,
             label="mean confidence")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title} — ECE = {value:.3f}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, bins.count, width=width * 0.9, color="tab:gray", edgecolor="black")
    bottom.set_xlabel("confidence (top label)")
    bottom.set_ylabel("count")
    return fig


def confusion_matrix_plot(
    labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str], title: str = "Confusion matrix"
) -> Figure:
    """2×2 counts with row-normalised rates; rows are true labels, columns predictions."""
    labels = np.asarray(labels).astype(int)
    predicted = np.asarray(predicted).astype(int)
    matrix = np.array([[np.sum((labels == t) & (predicted == p)) for p in (0, 1)] for t in (0, 1)])
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.4, 4.4), constrained_layout=True)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for t in (0, 1):
        for p in (0, 1):
            colour = "white" if rates[t, p] > 0.5 else "black"
            ax.text(p, t, f"{matrix[t, p]}\n({rates[t, p]:.0%})", ha="center", va="center", color=colour)
    names = [f"{i}: {name}" for i, name in enumerate(class_names)]
    ax.set_xticks([0, 1], names, fontsize=8)
    ax.set_yticks([0, 1], names, fontsize=8)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"{title} (acc = {np.trace(matrix) / matrix.sum():.3f})")
    return fig


def learning_curves(history: Sequence[Mapping[str, float]], title: str = "Learning curves") -> Figure:
    """Train/val loss and val AUROC per epoch, side by side; the best-AUROC epoch is marked."""
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="val loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("BCE loss")
    loss_ax.legend()
    auc = [h["val_auroc"] for h in history]
    auc_ax.plot(epochs, auc, "o-", color="tab:green", label="val AUROC")
    best = int(np.nanargmax(auc)) if np.isfinite(auc).any() else 0
    auc_ax.axvline(epochs[best], color="grey", linestyle=":", label=f"best epoch {epochs[best]}")
    auc_ax.set_xlabel("epoch")
    auc_ax.set_ylabel("AUROC")
    auc_ax.legend()
    fig.suptitle(title)
    return fig


def save(fig: Figure, path) -> None:
    """Write a figure to disk and release it."""
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
