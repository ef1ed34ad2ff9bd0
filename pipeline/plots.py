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


def _ok_points(rows: Sequence[Mapping]) -> list[Mapping]:
    return [r for r in rows if r.get("status") == "ok"]


def _point_label(row: Mapping) -> str:
    return f"{row['rule']} (t={row['threshold']:.3f}): TPR {row['tpr']:.2f}, FPR {row['fpr']:.2f}"


def roc_with_points(probs: np.ndarray, labels: np.ndarray, rows: Sequence[Mapping]) -> Figure:
    """Test ROC curve with the operating points (thresholds chosen on validation) marked."""
    from sklearn.metrics import roc_curve

    from pipeline.metrics import auroc

    fpr, tpr, _ = roc_curve(labels, probs)
    fig, ax = plt.subplots(figsize=(6.4, 5.6), constrained_layout=True)
    ax.plot(fpr, tpr, color="black", label=f"ROC (test), AUROC = {auroc(probs, labels):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    for marker, row in zip("osD^v<>ph*", _ok_points(rows)):
        ax.plot(row["fpr"], row["tpr"], marker, markersize=8, label=_point_label(row))
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"ROC on test (n = {len(labels)}), thresholds chosen on validation")
    ax.legend(loc="lower right", fontsize=7)
    return fig


def pr_with_points(probs: np.ndarray, labels: np.ndarray, rows: Sequence[Mapping], positive_name: str) -> Figure:
    """Test precision–recall curve of the positive class with average precision and operating points."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(labels, probs)
    prevalence = float(np.mean(labels))
    fig, ax = plt.subplots(figsize=(6.4, 5.6), constrained_layout=True)
    ax.step(recall, precision, where="post", color="black",
            label=f"PR (test), AP = {average_precision_score(labels, probs):.3f}")
    ax.axhline(prevalence, linestyle=":", color="grey", label=f"prevalence = {prevalence:.3f}")
    for marker, row in zip("osD^v<>ph*", _ok_points(rows)):
        ax.plot(row["tpr"], row["precision"], marker, markersize=8,
                label=f"{row['rule']} (t={row['threshold']:.3f}): recall {row['tpr']:.2f}, precision {row['precision']:.2f}")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title(f"Precision–recall on test, positive class 1 = {positive_name}")
    ax.legend(loc="lower left", fontsize=7)
    return fig


def error_gallery(
    images: np.ndarray, errors: Sequence[Mapping], names: Mapping[str, str], confidence: float, limit: int
) -> Figure:
    """The most confident test errors (image, true/predicted label, p of class 1), most confident first."""
    shown = list(errors[:limit])
    columns = max(1, min(6, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.7 * rows + 0.6), squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    for ax, error in zip(axes.flat, shown):
        ax.imshow(images[error["position"]], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"#{error['index']}  p(1) = {error['prob']:.3f}\ntrue {error['true']}: {names[str(error['true'])][:16]}\n"
                     f"pred {error['predicted']}: {names[str(error['predicted'])][:16]}", fontsize=7)
    if not shown:
        axes[0, 0].text(0.5, 0.5, f"no test errors with\nconfidence >= {confidence:g}", ha="center", va="center")
    fig.suptitle(f"{len(errors)} test errors with top-label confidence >= {confidence:g} at threshold 0.5 "
                 f"(showing {len(shown)})", fontsize=9)
    return fig


def robustness_curves(rows: Sequence[Mapping]) -> Figure:
    """AUROC, accuracy and ECE vs. severity, one line per corruption, the clean value as reference."""
    clean = rows[0]
    names = list(dict.fromkeys(r["corruption"] for r in rows[1:]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
    for ax, (key, label) in zip(axes, (("auroc", "AUROC"), ("acc", "accuracy (threshold 0.5)"), ("ece", "ECE (top label)"))):
        ax.axhline(clean[key], color="black", linestyle="--", label=f"clean = {clean[key]:.3f}")
        for name in names:
            points = [r for r in rows if r["corruption"] == name]
            ax.plot([r["severity"] for r in points], [r[key] for r in points], "o-",
                    label=f"{name} (sev {points[-1]['severity']}: {points[-1][key]:.3f})")
        ax.set_xlabel("severity")
        ax.set_ylabel(label)
        ax.set_xticks(sorted({r["severity"] for r in rows[1:]}))
        ax.set_title(f"{label} vs. severity (clean {clean[key]:.3f})")
        ax.legend(fontsize=7)
    fig.suptitle("Test split under corruptions")
    return fig


def entropy_histogram(entropy: np.ndarray, errors: np.ndarray, mc: Mapping[str, float]) -> Figure:
    """MC-dropout predictive entropy of correct vs. wrong test predictions, with the error-detection AUROC."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    bins = np.linspace(0, np.log(2), 21)
    ax.hist(entropy[~errors], bins=bins, alpha=0.6, color="tab:blue", label=f"correct (n = {int((~errors).sum())})")
    ax.hist(entropy[errors], bins=bins, alpha=0.6, color="tab:red", label=f"errors (n = {int(errors.sum())})")
    ax.set_xlabel("predictive entropy (nats; max ln 2)")
    ax.set_ylabel("test images")
    ax.set_title(f"MC dropout ({int(mc['mc_passes'])} passes, p = {mc['mc_dropout_p']:g}): "
                 f"error-detection AUROC = {mc['mc_error_auroc_entropy']:.3f}")
    ax.legend()
    return fig


def corruption_examples(clean: np.ndarray, examples: Mapping[tuple[str, int], np.ndarray], levels: Mapping[str, Sequence[float]]) -> Figure:
    """One test image clean and under every corruption (rows) and severity (columns)."""
    names = list(dict.fromkeys(n for n, _ in examples))
    severities = sorted({s for _, s in examples})
    fig, axes = plt.subplots(len(names), len(severities) + 1, figsize=(1.8 * (len(severities) + 1), 1.9 * len(names)),
                             squeeze=False, constrained_layout=True)
    for row, name in enumerate(names):
        axes[row, 0].imshow(clean, cmap="gray", vmin=0, vmax=1)
        axes[row, 0].set_title("clean", fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=8)
        for col, severity in enumerate(severities, start=1):
            axes[row, col].imshow(examples[(name, severity)], cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_title(f"sev {severity} ({levels[name][severity - 1]:g})", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Corruptions of the first test image (row: corruption; column: severity and level)", fontsize=9)
    return fig
