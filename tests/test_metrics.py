"""Metrics against independent references (scikit-learn, explicit loops)."""

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, f1_score, log_loss, precision_score, recall_score, roc_auc_score

from pipeline import metrics


@pytest.fixture()
def scored():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    probs = np.clip(0.5 + (labels - 0.5) * rng.uniform(0, 0.9, 400) + rng.normal(0, 0.15, 400), 0.001, 0.999)
    return probs, labels


def reference_ece(probs, labels, n_bins):
    """Guo et al.'s top-label ECE written out bin by bin."""
    conf = np.maximum(probs, 1 - probs)
    correct = ((probs >= 0.5).astype(int) == labels)
    total = 0.0
    for b in range(n_bins):
        low, high = b / n_bins, (b + 1) / n_bins
        inside = (conf > low) & (conf <= high) if b else (conf >= low) & (conf <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return total


def test_scores_match_sklearn(scored):
    probs, labels = scored
    predicted = (probs >= 0.5).astype(int)
    values = metrics.classification_metrics(probs, labels, n_bootstrap=200)
    assert values["auroc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert values["acc"] == pytest.approx(np.mean(predicted == labels))
    assert values["precision"] == pytest.approx(precision_score(labels, predicted))
    assert values["recall"] == pytest.approx(recall_score(labels, predicted))
    assert values["f1"] == pytest.approx(f1_score(labels, predicted))
    assert values["brier"] == pytest.approx(brier_score_loss(labels, probs))
    assert values["nll"] == pytest.approx(log_loss(labels, probs))


def test_auroc_handles_ties_like_sklearn():
    probs = np.array([0.2, 0.2, 0.7, 0.7, 0.7, 0.9])
    labels = np.array([0, 1, 0, 1, 1, 1])
    assert metrics.auroc(probs, labels) == pytest.approx(roc_auc_score(labels, probs))
    assert np.isnan(metrics.auroc(probs, np.ones(6)))


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_ece_matches_reference_loop(scored, n_bins):
    probs, labels = scored
    assert metrics.ece(probs, labels, n_bins) == pytest.approx(reference_ece(probs, labels, n_bins))


def test_equal_frequency_bins_hold_equal_counts(scored):
    probs, labels = scored
    bins = metrics.calibration_bins(probs, labels, 10, "quantile")
    assert bins.count.tolist() == [40] * 10
    conf = np.maximum(probs, 1 - probs)
    correct = (probs >= 0.5) == labels
    order = np.argsort(conf, kind="stable")
    expected = sum(len(g) / 400 * abs(correct[g].mean() - conf[g].mean()) for g in np.array_split(order, 10))
    assert metrics.ece(probs, labels, 10, "quantile") == pytest.approx(expected)


def test_class1_confidence_compares_probability_with_positive_rate():
    probs = np.array([0.1, 0.1, 0.9, 0.9])
    labels = np.array([0, 0, 1, 0])
    bins = metrics.calibration_bins(probs, labels, 10, confidence="class1")
    filled = bins.count > 0
    assert bins.accuracy[filled].tolist() == [0.0, 0.5]
    assert metrics.ece(probs, labels, 10, confidence="class1") == pytest.approx(0.5 * 0.1 + 0.5 * 0.4)


def test_mce_is_largest_bin_gap_and_bounds_ece(scored):
    probs, labels = scored
    assert metrics.mce(probs, labels) >= metrics.ece(probs, labels)
    perfect = np.array([1.0, 1.0, 0.0, 0.0])
    assert metrics.mce(perfect, np.array([1, 1, 0, 0])) == 0.0


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate(scored):
    probs, labels = scored
    low, high = metrics.bootstrap_auroc_ci(probs, labels, 500, seed=3)
    assert (low, high) == metrics.bootstrap_auroc_ci(probs, labels, 500, seed=3)
    assert low < metrics.auroc(probs, labels) < high and high - low < 0.2


def test_sigmoid_is_stable_for_large_logits():
    out = metrics.sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    assert out.tolist() == [0.0, 0.5, 1.0]
