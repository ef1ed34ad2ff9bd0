"""Binary classification and calibration metrics: pure functions of labels and class-1 scores.

Conventions: label 1 is the positive class; `probs` are p(class 1); predictions use threshold 0.5
unless given. ECE and MCE default to the *top-label* confidence (max(p, 1-p) against whether the
predicted label is right), the usual definition (Guo et al., 2017); `confidence="class1"` instead
bins p(class 1) against the observed fraction of positives, which is what a screening reader of
"probability of disease" cares about. Both are offered; logged `ece`/`ece_eqfreq`/`mce` are top-label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, recall_score

EPS = 1e-7


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    logits = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -logits))


@dataclass(frozen=True)
class Bins:
    """Per-bin statistics of a reliability diagram (empty bins have count 0 and NaN means)."""

    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


def _confidence_and_outcome(probs: np.ndarray, labels: np.ndarray, confidence: str) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if confidence == "top_label":
        predicted = (probs >= 0.5).astype(int)
        return np.maximum(probs, 1.0 - probs), (predicted == labels).astype(np.float64)
    if confidence == "class1":
        return probs, labels.astype(np.float64)
    raise ValueError(f"confidence must be 'top_label' or 'class1', got {confidence!r}")


def calibration_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10, strategy: str = "uniform", confidence: str = "top_label") -> Bins:
    """Group samples into bins by confidence: equal-width (`uniform`) or equal-count (`quantile`;
    equal up to ties, which stay together)."""
    conf, outcome = _confidence_and_outcome(probs, labels, confidence)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        which = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
        groups = [np.flatnonzero(which == b) for b in range(n_bins)]
        lower, upper = edges[:-1], edges[1:]
    elif strategy == "quantile":
        # edges at the confidence quantiles, as sklearn's calibration_curve: tied confidences share
        # a bin, so the result does not depend on row order (isotonic outputs are full of ties)
        edges = np.quantile(conf, np.linspace(0.0, 1.0, n_bins + 1))
        which = np.searchsorted(edges[1:-1], conf)
        groups = [np.flatnonzero(which == b) for b in range(n_bins)]
        lower = np.array([conf[g].min() if len(g) else np.nan for g in groups])
        upper = np.array([conf[g].max() if len(g) else np.nan for g in groups])
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")
    count = np.array([len(g) for g in groups])
    mean_conf = np.array([conf[g].mean() if len(g) else np.nan for g in groups])
    mean_outcome = np.array([outcome[g].mean() if len(g) else np.nan for g in groups])
    return Bins(np.asarray(lower), np.asarray(upper), count, mean_conf, mean_outcome)


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10, strategy: str = "uniform", confidence: str = "top_label") -> float:
    """Expected calibration error: sum over bins of |accuracy − confidence| weighted by bin size."""
    bins = calibration_bins(probs, labels, n_bins, strategy, confidence)
    filled = bins.count > 0
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(gaps * bins.count[filled]) / bins.count.sum())


MCE_MIN_COUNT = 5  # bins with fewer samples are left out of MCE: one image decides a near-empty bin's gap


def mce(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10, confidence: str = "top_label", min_count: int = MCE_MIN_COUNT) -> float:
    """Maximum calibration error over equal-width bins holding at least `min_count` samples (NaN
    when none does)."""
    bins = calibration_bins(probs, labels, n_bins, "uniform", confidence)
    filled = bins.count >= max(1, min_count)
    return float(np.max(np.abs(bins.accuracy[filled] - bins.confidence[filled]))) if filled.any() else float("nan")


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared error of p(class 1) against the 0/1 label."""
    return float(np.mean((np.asarray(probs, dtype=np.float64) - np.asarray(labels)) ** 2))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy (natural log) of probabilities clipped to [1e-7, 1 − 1e-7]; for
    scores that have logits use `nll_from_logits`, which is exact (clipping caps a wrong answer at 16 nats)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(labels)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def nll_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy of sigmoid(logit), computed stably from the logits (no clipping)."""
    z = np.asarray(logits, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - np.asarray(labels) * z))


def _auroc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each row via the Mann–Whitney rank statistic (ties get average ranks); NaN if one class."""
    ranks = rankdata(scores, axis=-1)
    n_pos = labels.sum(axis=-1)
    n_neg = labels.shape[-1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * labels).sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of any score that ranks class 1 higher (probabilities or logits);
    NaN when only one class is present."""
    return float(_auroc_rows(np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)))


def bootstrap_auroc_ci(probs: np.ndarray, labels: np.ndarray, n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUROC of a score (resamples with a single class are skipped)."""
    if n_resamples == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    index = rng.integers(0, len(labels), size=(n_resamples, len(labels)))
    values = _auroc_rows(probs[index], labels[index])
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def classification_metrics(
    logits: np.ndarray,
    labels: np.ndarray,
    threshold: float = 0.5,
    n_bins: int = 10,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """The DESIGN's final metric set for one split (keys without the `val_`/`test_` prefix), from
    class-1 logits: AUROC ranks and NLL use the logits themselves, so probabilities that round to
    1.0 (logit > ~37) neither tie in the ranking nor cap the loss."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = sigmoid(logits)
    labels = np.asarray(labels).astype(int)
    predicted = (probs >= threshold).astype(int)
    low, high = bootstrap_auroc_ci(logits, labels, n_bootstrap, seed)
    return {
        "acc": float(np.mean(predicted == labels)),
        "balanced_acc": float(balanced_accuracy_score(labels, predicted)) if len(np.unique(labels)) == 2 else float("nan"),
        "prevalence": float(np.mean(labels == 1)),
        "auroc": auroc(logits, labels),
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "ece": ece(probs, labels, n_bins, "uniform"),
        "ece_eqfreq": ece(probs, labels, n_bins, "quantile"),
        "ece_class1": ece(probs, labels, n_bins, "uniform", "class1"),
        "mce": mce(probs, labels, n_bins),
        "brier": brier(probs, labels),
        "nll": nll_from_logits(logits, labels),
        "auroc_ci_low": low,
        "auroc_ci_high": high,
    }
