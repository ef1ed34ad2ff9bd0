"""Figures as matplotlib Figure objects (headless Agg backend); callers log or save and close them."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.metrics import calibration_bins, ece  # noqa: E402


RELIABILITY_AXES = {"top_label": ("confidence (top label)", "accuracy"), "class1": ("mean predicted p(class 1)", "fraction of class 1")}


def reliability_diagram(
    probs: np.ndarray,
    labels: np.ndarray,
    n_bins: int = 10,
    title: str = "Reliability",
    ax_pair=None,
    confidence: str = "top_label",
    strategy: str = "uniform",
) -> Figure:
    """Observed outcome vs. mean predicted value per bin, with a bin-count histogram below.

    `confidence="top_label"`: accuracy vs. the predicted class's probability (≥ 0.5 for a binary
    task, so only the upper half of [0, 1] fills); `"class1"`: the fraction of class 1 vs. p(class 1)
    over all of [0, 1], the plan's diagram. `strategy`: equal-width (`uniform`) or equal-count
    (`quantile`) bins. The title ends with that binning's ECE, e.g. `Reliability (test) — ECE = 0.073`.
    """
    bins = calibration_bins(probs, labels, n_bins, strategy, confidence)
    value = ece(probs, labels, n_bins, strategy, confidence)
    if ax_pair is None:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True)
    else:
        top, bottom = ax_pair
        fig = top.figure
    filled = bins.count > 0
    if strategy == "uniform":
        centers, widths = (bins.lower + bins.upper) / 2, np.full(n_bins, 0.9 / n_bins)
    else:  # equal-count bins: each bar spans its bin's range of predictions
        centers, widths = (bins.lower + bins.upper) / 2, np.maximum(bins.upper - bins.lower, 0.01)
    x_label, y_label = RELIABILITY_AXES[confidence]
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.bar(centers[filled], bins.accuracy[filled], width=widths[filled], color="tab:blue", edgecolor="black", label=f"{y_label} per bin")
    top.bar(
        centers[filled],
        bins.confidence[filled] - bins.accuracy[filled],
        bottom=bins.accuracy[filled],
        width=widths[filled],
        facecolor="none",
        edgecolor="tab:red",
        hatch="//",
        label="gap to the mean prediction",
    )
    top.plot(centers[filled], bins.confidence[filled], "_", color="black", markersize=18, markeredgewidth=2, label="mean prediction")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel(y_label)
    binning = "equal-width" if strategy == "uniform" else "equal-count"
    top.set_title(f"{title} — ECE = {value:.3f}\n({n_bins} {binning} bins)", fontsize=10)
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers[filled], bins.count[filled], width=widths[filled], color="tab:gray", edgecolor="black")
    bottom.set_xlabel(x_label)
    bottom.set_ylabel("count")
    return fig


def confusion_matrix_plot(labels: np.ndarray, predicted: np.ndarray, class_names: Sequence[str], title: str = "Confusion matrix") -> Figure:
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
    integer_epochs(loss_ax, auc_ax)
    fig.suptitle(title)
    return fig


def integer_epochs(*axes: plt.Axes) -> None:
    """Whole-number epoch ticks (a few epochs otherwise get ticks at 1.25, 1.5, ...)."""
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def save(fig: Figure, path) -> None:
    """Write a figure to disk and release it."""
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _ok_points(rows: Sequence[Mapping]) -> list[Mapping]:
    return [r for r in rows if r.get("status") == "ok"]


def _point_label(row: Mapping) -> str:
    return f"{row['rule']} (t={row['threshold']:.3f}): TPR {row['tpr']:.2f}, FPR {row['fpr']:.2f}"


def roc_with_points(scores: np.ndarray, labels: np.ndarray, rows: Sequence[Mapping], positive: str) -> Figure:
    """Test ROC curve of the positive class's scores against 0/1 labels (1 = `positive`, e.g.
    `0 (malignant)`; logits: they rank without the ties of saturated probabilities) with the operating
    points (thresholds chosen on validation) marked as rings of decreasing size, so points that
    coincide stay visible."""
    from sklearn.metrics import roc_curve

    from pipeline.metrics import auroc

    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(6.4, 5.6), constrained_layout=True)
    ax.plot(fpr, tpr, color="black", label=f"ROC (test), AUROC = {auroc(scores, labels):.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    for i, (marker, row) in enumerate(zip("osD^v<>ph*", _ok_points(rows))):
        ax.plot(row["fpr"], row["tpr"], marker, markersize=14 - 1.2 * i, markerfacecolor="none", markeredgewidth=1.8, label=_point_label(row))
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"ROC on test (n = {len(labels)}), positive class: {positive}\nthresholds chosen on validation")
    ax.legend(loc="lower right", fontsize=7)
    return fig


def pr_with_points(scores: np.ndarray, labels: np.ndarray, rows: Sequence[Mapping], positive: str) -> Figure:
    """Test precision–recall curve of the positive class (its scores, e.g. logits, against 0/1 labels,
    1 = `positive`) with average precision and operating points."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(labels, scores)
    prevalence = float(np.mean(labels))
    fig, ax = plt.subplots(figsize=(6.4, 5.6), constrained_layout=True)
    ax.step(recall, precision, where="post", color="black", label=f"PR (test), AP = {average_precision_score(labels, scores):.3f}")
    ax.axhline(prevalence, linestyle=":", color="grey", label=f"prevalence = {prevalence:.3f}")
    for marker, row in zip("osD^v<>ph*", _ok_points(rows)):
        ax.plot(
            row["tpr"],
            row["precision"],
            marker,
            markersize=8,
            label=f"{row['rule']} (t={row['threshold']:.3f}): recall {row['tpr']:.2f}, precision {row['precision']:.2f}",
        )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title(f"Precision–recall on test, positive class: {positive}")
    ax.legend(loc="lower left", fontsize=7)
    return fig


def error_gallery(images: np.ndarray, errors: Sequence[Mapping], names: Mapping[str, str], confidence: float, limit: int) -> Figure:
    """The most confident test errors (image, true/predicted label, p of class 1), most confident first."""
    shown = list(errors[:limit])
    columns = max(1, min(6, len(shown)))
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.7 * rows + 0.6), squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    for ax, error in zip(axes.flat, shown):
        ax.imshow(images[error["position"]], cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"#{error['index']}  p(1) = {error['prob']:.3f}\ntrue {error['true']}: {names[str(error['true'])][:16]}\n"
            f"pred {error['predicted']}: {names[str(error['predicted'])][:16]}",
            fontsize=7,
        )
    if not shown:
        axes[0, 0].text(0.5, 0.5, f"no test errors with\nconfidence >= {confidence:g}", ha="center", va="center")
    fig.suptitle(f"{len(errors)} test errors with top-label confidence >= {confidence:g} at threshold 0.5 (showing {len(shown)})", fontsize=9)
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
            ax.plot([r["severity"] for r in points], [r[key] for r in points], "o-", label=f"{name} (sev {points[-1]['severity']}: {points[-1][key]:.3f})")
        ax.set_xlabel("severity")
        ax.set_ylabel(label)
        ax.set_xticks(sorted({r["severity"] for r in rows[1:]}))
        ax.set_title(f"{label} vs. severity (clean {clean[key]:.3f})")
        ax.legend(fontsize=7)
    fig.suptitle("Test split under corruptions")
    return fig


def entropy_histogram(entropy: np.ndarray, errors: np.ndarray, mc: Mapping[str, float]) -> Figure:
    """MC-dropout predictive entropy of correct vs. wrong test predictions, with the error-detection
    AUROC; each group as a share of itself, so a few errors are as visible as many correct images."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    bins = np.linspace(0, np.log(2), 21)
    for mask, color, name in ((~errors, "tab:blue", "correct"), (errors, "tab:red", "errors")):
        if mask.any():
            ax.hist(entropy[mask], bins=bins, weights=np.full(int(mask.sum()), 1 / mask.sum()), alpha=0.6, color=color, label=f"{name} (n = {int(mask.sum())})")
    ax.set_xlabel("predictive entropy (nats; max ln 2)")
    ax.set_ylabel("share of the group's test images")
    ax.set_title(f"MC dropout ({int(mc['mc_passes'])} passes, p = {mc['mc_dropout_p']:g}): error-detection AUROC = {mc['mc_error_auroc_entropy']:.3f}")
    ax.legend()
    return fig


def corruption_examples(clean: np.ndarray, examples: Mapping[tuple[str, int], np.ndarray], levels: Mapping[str, Sequence[float]]) -> Figure:
    """One test image clean and under every corruption (rows) and severity (columns)."""
    names = list(dict.fromkeys(n for n, _ in examples))
    severities = sorted({s for _, s in examples})
    fig, axes = plt.subplots(len(names), len(severities) + 1, figsize=(1.8 * (len(severities) + 1), 1.9 * len(names)), squeeze=False, constrained_layout=True)
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


def _show(ax, image: np.ndarray) -> None:
    """Draw one uint8 image (grey or RGB) without ticks."""
    ax.imshow(image.squeeze(), cmap="gray" if image.ndim == 2 or image.shape[-1] == 1 else None, vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def sample_grid(images: np.ndarray, picks: Mapping[int, np.ndarray], label_names: Mapping[str, str], title: str) -> Figure:
    """One row of sample images per class; each row is labelled with the class and each tile with its index."""
    columns = max(len(v) for v in picks.values())
    fig, axes = plt.subplots(len(picks), columns, figsize=(1.3 * columns + 1.2, 1.5 * len(picks) + 0.6), squeeze=False, constrained_layout=True)
    for row, (label, indices) in enumerate(picks.items()):
        for col, ax in enumerate(axes[row]):
            if col < len(indices):
                _show(ax, images[indices[col]])
                ax.set_title(f"#{indices[col]}", fontsize=7)
            else:
                ax.axis("off")
        axes[row][0].set_ylabel(f"class {label}\n{label_names[str(label)]}", fontsize=8)
    fig.suptitle(title)
    return fig


def intensity_histograms(splits: Mapping[str, object], label_names: Mapping[str, str], bins: int, title: str) -> Figure:
    """Pixel-intensity density per class, one panel per split (`splits` values have images and labels)."""
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.4), sharey=True, constrained_layout=True)
    edges = np.linspace(0, 255, bins + 1)
    for ax, (name, split) in zip(np.atleast_1d(axes), splits.items()):
        for label, colour in ((0, "tab:blue"), (1, "tab:orange")):
            pixels = split.images[split.labels == label].reshape(-1)
            ax.hist(
                pixels,
                bins=edges,
                density=True,
                histtype="step",
                linewidth=1.6,
                color=colour,
                label=f"{label}: {label_names[str(label)]} (n={int(np.sum(split.labels == label))})",
            )
        ax.set_title(name)
        ax.set_xlabel("pixel intensity (0-255)")
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("density")
    fig.suptitle(title)
    return fig


def mistake_gallery(tiles: np.ndarray, rows, label_names: Mapping[str, str], title: str) -> Figure:
    """Misclassified images, each titled with true label, predicted label and p(predicted class)."""
    count = len(rows)
    fig, axes = plt.subplots(1, max(count, 1), figsize=(2.1 * max(count, 1), 2.9), squeeze=False, constrained_layout=True)
    if count == 0:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    for ax, tile, row in zip(axes[0], tiles, rows.itertuples()):
        _show(ax, tile)
        ax.set_title(
            f"test #{row.index}\ntrue: {row.label} {label_names[str(row.label)]}\n"
            f"pred: {row.predicted} {label_names[str(row.predicted)]}\np(pred) = {row.confidence:.3f}",
            fontsize=7,
        )
    fig.suptitle(title, fontsize=9, y=1.06)  # above the four-line tile titles (saved with bbox_inches="tight")
    return fig


def ablation_errorbars(summary: Sequence[Mapping[str, float]], metric: str, title: str) -> Figure:
    """Mean ± std of a metric per ablation variant (a point with error bars, not a bar: the axis
    does not start at 0, and a bar's length would overstate the gaps), each seed's value as a dot."""
    fig, ax = plt.subplots(figsize=(1.6 * len(summary) + 2.5, 3.8), constrained_layout=True)
    positions = np.arange(len(summary))
    means = [row[f"{metric}_mean"] for row in summary]
    stds = [np.nan_to_num(row[f"{metric}_std"]) for row in summary]
    ax.errorbar(positions, means, yerr=stds, fmt="s", markersize=8, capsize=8, color="tab:blue", label="mean ± sample std over seeds")
    for x, row in zip(positions, summary):
        values = row[f"{metric}_values"]
        ax.plot([x + 0.12] * len(values), values, "o", color="black", markersize=4, label="one seed" if x == 0 else None)
    ax.set_xlim(-0.6, len(summary) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(positions, [f"{row['variant']}\n(n={row['n']})" for row in summary], fontsize=8)
    ax.set_xlabel("augmentation variant")
    ax.set_ylabel(metric.replace("_", " ").replace("auroc", "AUROC").replace("acc", "accuracy"))
    low = min(min(row[f"{metric}_values"]) for row in summary)
    ax.set_ylim(max(0.0, low - 0.1), 1.0)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title)
    return fig


def duplicate_pairs(pairs: Sequence[tuple[str, np.ndarray, str, np.ndarray]], title: str) -> Figure:
    """Example exact-duplicate pairs as columns: first image above, its duplicate below."""
    count = max(len(pairs), 1)
    fig, axes = plt.subplots(2, count, figsize=(1.7 * count + 0.8, 3.9), squeeze=False, constrained_layout=True)
    if not pairs:
        for ax in axes[:, 0]:
            ax.axis("off")
        axes[0][0].text(0.5, 0.0, "no exact duplicates", ha="center", va="center")
    for col, (caption_a, image_a, caption_b, image_b) in enumerate(pairs):
        _show(axes[0][col], image_a)
        axes[0][col].set_title(caption_a, fontsize=7)
        _show(axes[1][col], image_b)
        axes[1][col].set_title(caption_b, fontsize=7)
    axes[0][0].set_ylabel("image", fontsize=8)
    axes[1][0].set_ylabel("its duplicate", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def loss_curves_by_label(histories: Mapping[str, Sequence[Mapping[str, float]]], title: str) -> Figure:
    """Train (solid) and val (dashed) loss, and val AUROC, per epoch for several labelled runs."""
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(9.5, 3.8), constrained_layout=True)
    for (label, history), colour in zip(histories.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        epochs = [h["epoch"] for h in history]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], "-", color=colour, label=f"{label}: train")
        loss_ax.plot(epochs, [h["val_loss"] for h in history], "--", color=colour, label=f"{label}: val")
        auc_ax.plot(epochs, [h["val_auroc"] for h in history], "o-", color=colour, label=label)
    for ax in (loss_ax, auc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("BCE loss")
    loss_ax.legend(fontsize=8)
    auc_ax.set_xlabel("epoch")
    auc_ax.set_ylabel("val AUROC")
    auc_ax.legend(title="finetune", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def paired_differences(records: Sequence[Mapping], metrics: Sequence[str], title: str) -> Figure:
    """Mean paired difference (a − b) with its 95% interval against the label fraction: one row of
    panels per SSL method, one panel per metric, one line per comparison, around a zero line."""
    methods = list(dict.fromkeys(r.get("ssl_method", "") for r in records))
    fig, axes = plt.subplots(len(methods), len(metrics), figsize=(4.6 * len(metrics), 3.8 * len(methods)), squeeze=False, constrained_layout=True)
    fractions = sorted({r["label_fraction"] for r in records})
    for row, method in enumerate(methods):
        mine = [r for r in records if r.get("ssl_method", "") == method]
        comparisons = list(dict.fromkeys(r["comparison"] for r in mine))
        for ax, metric in zip(axes[row], metrics):
            for k, comparison in enumerate(comparisons):
                points = sorted((r for r in mine if r["comparison"] == comparison and r["metric"] == metric), key=lambda r: r["label_fraction"])
                if not points:
                    continue
                nudge = 1 + 0.07 * (k - (len(comparisons) - 1) / 2)
                mean = np.array([r["diff_mean"] for r in points])
                low, high = np.array([r["ci_low"] for r in points]), np.array([r["ci_high"] for r in points])
                ax.errorbar(
                    [r["label_fraction"] * nudge for r in points],
                    mean,
                    yerr=np.nan_to_num([mean - low, high - mean]),
                    marker="o",
                    capsize=3,
                    label=comparison.replace(f" ({method})", ""),
                )
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
            ax.set_xlabel("fraction of training labels (log scale)")
            better = "lower is better" if metric.endswith("ece") else "higher is better"
            ax.set_ylabel(f"Δ {metric.removeprefix('test_').replace('_', ' ')} ({better})")
            ax.set_title(f"{method} encoder" if method else metric, fontsize=10)
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.suptitle(title)
    return fig
