"""Week 7: decision thresholds chosen on validation and applied unchanged to test.

A sample is called positive when p(positive class) >= threshold, as in sklearn's `roc_curve`. The
positive class is label 1 or label 0 (`positive_class`; by default the dataset's clinical finding):
with 0, every rule, rate and curve works on p(class 0) = 1 − p(class 1) against flipped labels
(`oriented`), so thresholds are on p(class 0). The high-confidence errors stay in class labels, at
p(class 1) >= 0.5. Rules: the default 0.5, Youden's J (max TPR − FPR), max F1, the most specific
threshold reaching a target TPR, and the most sensitive threshold staying within a target FPR. A
target the validation split cannot support is reported with `status = unreachable` and an
explanation, never clipped: a TPR target τ needs at least one allowed miss, n_pos·(1 − τ) >= 1, or
it cannot be told apart from TPR 1 (likewise an FPR target φ needs n_neg·φ >= 1); an FPR target
below the smallest FPR any threshold reaches (negatives tied with the top scores) could only be met
by calling nothing positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from medmnist.info import INFO
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from pipeline import metrics, plots, tables, tracking
from pipeline.gallery import STUDENT_COLUMNS
from pipeline.source import Predictions, load_source

RATES = ("tpr", "specificity", "fpr", "precision", "npv", "f1")
TOL = 1e-9


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold rule's choice on validation: `threshold` is NaN when `status` is unreachable."""

    key: str
    rule: str
    target: float
    threshold: float
    status: str = "ok"
    note: str = ""


def oriented(predictions: Predictions, positive_class: int) -> Predictions:
    """The predictions with `positive_class` as label 1: for class 0, labels flipped and logits negated (probs = p(class 0))."""
    if positive_class == 1:
        return predictions
    return Predictions(predictions.index, 1 - predictions.labels, -predictions.logits)


def positive_text(dataset: str, positive_class: int) -> str:
    """The positive class with its name, as tables, plots and the terminal show it: `0 (malignant)`."""
    return f"{positive_class} ({INFO[dataset]['label'][str(positive_class)]})"


def rates_from_counts(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """TPR, specificity, FPR, precision, NPV and F1 from confusion counts (NaN on a zero denominator)."""
    tp, fp, tn, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, tn, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "tpr": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "fpr": fp / (fp + tn),
            "precision": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }


def confusion_counts(probs: np.ndarray, labels: np.ndarray, threshold: float, axis: int = -1) -> tuple[np.ndarray, ...]:
    """TP, FP, TN, FN of `probs >= threshold` against 0/1 labels, summed along `axis`."""
    predicted = np.asarray(probs) >= threshold
    positive = np.asarray(labels) == 1
    return tuple(np.sum(a & b, axis=axis) for a, b in ((predicted, positive), (predicted, ~positive), (~predicted, ~positive), (~predicted, positive)))


def rates_at(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion counts and every rate in RATES at one threshold."""
    counts = confusion_counts(probs, labels, threshold)
    values = {k: float(v) for k, v in rates_from_counts(*counts).items()}
    return {**dict(zip(("tp", "fp", "tn", "fn"), map(int, counts))), **values}


def bootstrap_rates(probs: np.ndarray, labels: np.ndarray, threshold: float, n_resamples: int, seed: int, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CI of each rate at a fixed threshold (resamples of the test split)."""
    if n_resamples == 0:
        return {r: (math.nan, math.nan) for r in RATES}
    index = np.random.default_rng(seed).integers(0, len(labels), size=(n_resamples, len(labels)))
    values = rates_from_counts(*confusion_counts(np.asarray(probs)[index], np.asarray(labels)[index], threshold, axis=1))
    tail = (1 - level) / 2 * 100
    out = {}
    for rate, samples in values.items():
        finite = samples[np.isfinite(samples)]
        low, high = np.percentile(finite, [tail, 100 - tail]) if len(finite) else (math.nan, math.nan)
        out[rate] = (float(low), float(high))
    return out


def _roc(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FPR, TPR and thresholds at every distinct score (the leading +inf "call nothing" point dropped)."""
    fpr, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    finite = np.isfinite(thresholds)
    return fpr[finite], tpr[finite], thresholds[finite]


def youden_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising Youden's J = TPR − FPR (the highest one among ties)."""
    fpr, tpr, thresholds = _roc(probs, labels)
    return float(thresholds[int(np.argmax(tpr - fpr))])


def max_f1_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximising F1 of the positive class."""
    precision, recall, thresholds = precision_recall_curve(labels, probs)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1]))
    return float(thresholds[int(np.argmax(f1))])


def target_tpr_point(probs: np.ndarray, labels: np.ndarray, target: float) -> OperatingPoint:
    """The highest threshold whose validation TPR reaches `target`, or unreachable (too few positives)."""
    key, rule = f"tpr{target * 100:g}", f"TPR >= {target:g}"
    n_pos = int(np.sum(labels))
    if n_pos * (1 - target) < 1 - TOL:
        needed = math.ceil(1 / (1 - target) - TOL)
        note = f"validation has {n_pos} positives; TPR {target:g} needs >= {needed} to allow one miss"
        return OperatingPoint(key, rule, target, math.nan, "unreachable", note)
    _, tpr, thresholds = _roc(probs, labels)
    return OperatingPoint(key, rule, target, float(thresholds[int(np.argmax(tpr >= target - TOL))]))


def target_fpr_point(probs: np.ndarray, labels: np.ndarray, target: float) -> OperatingPoint:
    """The lowest threshold whose validation FPR stays within `target`, or unreachable."""
    key, rule = f"fpr{target * 100:g}", f"FPR <= {target:g}"
    n_neg = int(np.sum(labels == 0))
    if n_neg * target < 1 - TOL:
        needed = math.ceil(1 / target - TOL)
        note = f"validation has {n_neg} negatives; FPR {target:g} needs >= {needed} to allow one false positive"
        return OperatingPoint(key, rule, target, math.nan, "unreachable", note)
    fpr, _, thresholds = _roc(probs, labels)
    within = np.flatnonzero(fpr <= target + TOL)
    if len(within) == 0:
        note = f"the smallest validation FPR of any threshold is {fpr[0]:.3f} (ties among the top scores)"
        return OperatingPoint(key, rule, target, math.nan, "unreachable", note)
    return OperatingPoint(key, rule, target, float(thresholds[within[-1]]))


def choose_points(val: Predictions, target_tprs: Sequence[float], target_fprs: Sequence[float]) -> list[OperatingPoint]:
    """Every rule's operating point, chosen on the validation split only."""
    probs, labels = val.probs, val.labels
    points = [
        OperatingPoint("default", "default 0.5", math.nan, 0.5),
        OperatingPoint("youden", "Youden's J", math.nan, youden_threshold(probs, labels)),
        OperatingPoint("max_f1", "max F1", math.nan, max_f1_threshold(probs, labels)),
    ]
    points += [target_tpr_point(probs, labels, t) for t in target_tprs]
    points += [target_fpr_point(probs, labels, t) for t in target_fprs]
    return points


def threshold_rows(points: Sequence[OperatingPoint], val: Predictions, test: Predictions, n_resamples: int, seed: int) -> list[dict[str, Any]]:
    """One row per rule: threshold, rates reached on validation, test rates with bootstrap CIs."""
    rows = []
    for point in points:
        row: dict[str, Any] = {"rule": point.rule, "key": point.key, "target": point.target, "status": point.status, "threshold": point.threshold}
        if point.status == "ok":
            on_val = rates_at(val.probs, val.labels, point.threshold)
            row.update(val_tpr=on_val["tpr"], val_fpr=on_val["fpr"], **rates_at(test.probs, test.labels, point.threshold))
            for rate, (low, high) in bootstrap_rates(test.probs, test.labels, point.threshold, n_resamples, seed).items():
                row.update({f"{rate}_ci_low": low, f"{rate}_ci_high": high})
        row["note"] = point.note
        rows.append(row)
    return rows


CSV_COLUMNS = [
    "rule",
    "key",
    "target",
    "status",
    "positive_class",
    "threshold",
    "val_tpr",
    "val_fpr",
    "tp",
    "fp",
    "tn",
    "fn",
    *(f"{r}{s}" for r in RATES for s in ("", "_ci_low", "_ci_high")),
    "note",
]


def markdown_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the Markdown table: each test rate as `value [low, high]`."""
    out = []
    for row in rows:
        short = {k: row.get(k, math.nan) for k in ("rule", "status", "threshold", "val_tpr", "val_fpr")}
        for rate in RATES:
            value = row.get(rate, math.nan)
            short[rate] = "" if math.isnan(value) else f"{value:.3f} [{row[f'{rate}_ci_low']:.3f}, {row[f'{rate}_ci_high']:.3f}]"
        short["note"] = row["note"]
        out.append(short)
    return out


def markdown_table(rows: Sequence[Mapping[str, Any]], positive: str) -> str:
    """table.md: which class is positive, then one row per rule (markdown_rows)."""
    short = markdown_rows(rows)
    heading = f"Positive class: {positive}. Thresholds are on its probability; TPR, FPR, precision, NPV and F1 refer to it.\n\n"
    return heading + tables.to_markdown(short, list(short[0]))


def metric_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """`threshold_<key>` and `test_<rate>_<key>` per rule (NaN where unreachable)."""
    values = {}
    for row in rows:
        values[f"threshold_{row['key']}"] = row["threshold"]
        values.update({f"test_{rate}_{row['key']}": row.get(rate, math.nan) for rate in RATES})
    return values


ERROR_COLUMNS = ["index", "true", "predicted", "prob", "note", *STUDENT_COLUMNS]


def high_confidence_errors(test: Predictions, confidence: float) -> list[dict[str, Any]]:
    """Test errors at threshold 0.5 whose top-label confidence max(p, 1 − p) is >= `confidence`.

    Each row leaves three columns empty for the student: `note` (what the image shows), `hypothesis`
    (why the model erred) and `possible_fix` (what might prevent it): a note is an observation, not
    yet a hypothesis.
    """
    probs = test.probs
    predicted = (probs >= 0.5).astype(int)
    top = np.maximum(probs, 1 - probs)
    wrong = np.flatnonzero((predicted != test.labels) & (top >= confidence))
    wrong = wrong[np.argsort(-top[wrong], kind="stable")]
    return [
        {
            "position": int(k),
            "index": int(test.index[k]),
            "true": int(test.labels[k]),
            "predicted": int(predicted[k]),
            "prob": float(probs[k]),
            "confidence": float(top[k]),
            "note": "",
            **dict.fromkeys(STUDENT_COLUMNS, ""),
        }
        for k in wrong
    ]


def run_thresholds(cfg: Mapping[str, Any], run_id: str = "latest", data_root: str = "") -> dict[str, float]:
    """Choose operating points on validation, report them on test, plot curves and an error gallery."""
    source = load_source(cfg["source_stages"], cfg["dataset"], run_id)
    images = source.test_arrays(data_root, source.image_size()).images
    val, test = oriented(source.val, cfg["positive_class"]), oriented(source.test, cfg["positive_class"])
    positive = positive_text(cfg["dataset"], cfg["positive_class"])
    points = choose_points(val, cfg["target_tprs"], cfg["target_fprs"])
    rows = [{**row, "positive_class": positive} for row in threshold_rows(points, val, test, cfg["bootstrap"], cfg["seed"])]
    values = metric_values(rows)
    values["test_auroc"] = metrics.auroc(test.logits, test.labels)
    values["test_average_precision"] = float(average_precision_score(test.labels, test.logits))
    errors = high_confidence_errors(source.test, cfg["confidence"])
    values["high_confidence_errors"] = len(errors)
    names = dict(INFO[cfg["dataset"]]["label"])
    name = f"thresholds-{source.tags()['model']}-{source.run_id[:8]}"
    tags = {**source.tags(), "positive_class": str(cfg["positive_class"])}
    with tracking.tracked_run("thresholds", cfg["dataset"], tags, run_name=name):
        tracking.log_config(cfg)
        tracking.log_metrics(values)
        tracking.log_text(tables.to_csv(rows, CSV_COLUMNS), "thresholds/table.csv")
        tracking.log_text(markdown_table(rows, positive), "thresholds/table.md")
        tracking.log_text(tables.to_csv(errors, ERROR_COLUMNS), "thresholds/high_confidence_errors.csv")
        tracking.log_figure(plots.roc_with_points(test.logits, test.labels, rows, positive), "plots/roc.png")
        tracking.log_figure(plots.pr_with_points(test.logits, test.labels, rows, positive), "plots/pr.png")
        gallery = plots.error_gallery(images, errors, names, cfg["confidence"], cfg["gallery_max"])
        tracking.log_figure(gallery, "plots/high_confidence_errors.png")
    return values
