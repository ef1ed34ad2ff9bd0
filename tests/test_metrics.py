"""Metrics against independent references (scikit-learn, explicit loops)."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, f1_score, log_loss, precision_score, recall_score, roc_auc_score

from pipeline import metrics


@pytest.fixture()
def scored():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    probs = np.clip(0.5 + (labels - 0.5) * rng.uniform(0, 0.9, 400) + rng.normal(0, 0.15, 400), 0.001, 0.999)
    return probs, labels


def reference_gaps(probs, labels, n_bins):
    """Guo et al.'s top-label bins written out one by one: (share of samples, |accuracy − confidence|)."""
    conf = np.maximum(probs, 1 - probs)
    correct = (probs >= 0.5).astype(int) == labels
    gaps = []
    for b in range(n_bins):
        low, high = b / n_bins, (b + 1) / n_bins
        inside = (conf > low) & (conf <= high) if b else (conf >= low) & (conf <= high)
        if inside.any():
            gaps.append((inside.mean(), abs(correct[inside].mean() - conf[inside].mean())))
    return gaps


def reference_ece(probs, labels, n_bins):
    return sum(share * gap for share, gap in reference_gaps(probs, labels, n_bins))


def reference_eqfreq_ece(probs, labels, n_bins):
    """Equal-frequency bins as sklearn's calibration_curve(strategy="quantile") draws them."""
    conf = np.maximum(probs, 1 - probs)
    correct = ((probs >= 0.5) == labels).astype(int)
    prob_true, prob_pred = calibration_curve(correct, conf, n_bins=n_bins, strategy="quantile")
    edges = np.percentile(conf, np.linspace(0, 100, n_bins + 1))
    counts = np.bincount(np.searchsorted(edges[1:-1], conf), minlength=n_bins)
    return float(np.sum(counts[counts > 0] / len(conf) * np.abs(prob_true - prob_pred)))


def logit(probs):
    return np.log(probs) - np.log1p(-probs)


def reference_bootstrap_ci(probs, labels, n, seed, level):
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(labels), size=(n, len(labels)))
    values = [roc_auc_score(labels[i], probs[i]) for i in index if 0 < labels[i].sum() < len(i)]
    return tuple(np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100]))


def test_scores_match_sklearn(scored):
    probs, labels = scored
    predicted = (probs >= 0.5).astype(int)
    values = metrics.classification_metrics(logit(probs), labels, n_bootstrap=200)
    assert values["auroc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert values["acc"] == pytest.approx(np.mean(predicted == labels))
    sensitivity, specificity = np.mean(predicted[labels == 1] == 1), np.mean(predicted[labels == 0] == 0)
    assert values["balanced_acc"] == pytest.approx((sensitivity + specificity) / 2)
    assert values["prevalence"] == pytest.approx(labels.mean())
    assert values["precision"] == pytest.approx(precision_score(labels, predicted))
    assert values["recall"] == pytest.approx(recall_score(labels, predicted))
    assert values["f1"] == pytest.approx(f1_score(labels, predicted))
    assert values["brier"] == pytest.approx(brier_score_loss(labels, probs))
    assert values["nll"] == pytest.approx(log_loss(labels, probs))
    assert values["ece"] == pytest.approx(reference_ece(probs, labels, 10))
    assert values["ece_eqfreq"] == pytest.approx(reference_eqfreq_ece(probs, labels, 10))
    assert values["mce"] == pytest.approx(max(gap for share, gap in reference_gaps(probs, labels, 10) if share * len(labels) >= 5))
    assert values["ece_class1"] == pytest.approx(metrics.ece(probs, labels, 10, confidence="class1"))
    ci = reference_bootstrap_ci(probs, labels, 200, 0, 0.95)
    assert (values["auroc_ci_low"], values["auroc_ci_high"]) == pytest.approx(ci)


def test_logged_ece_and_equal_frequency_ece_are_not_swapped():
    # labels drawn from the probabilities: gaps of both signs, so the binning matters (on the
    # uniformly over-confident `scored` data every binning gives mean confidence − accuracy)
    rng = np.random.default_rng(1)
    probs = rng.uniform(0, 1, 300)
    labels = (rng.uniform(0, 1, 300) < probs).astype(int)
    values = metrics.classification_metrics(logit(probs), labels, n_bootstrap=0)
    assert values["ece"] == pytest.approx(reference_ece(probs, labels, 10))
    assert values["ece_eqfreq"] == pytest.approx(reference_eqfreq_ece(probs, labels, 10))
    assert abs(values["ece"] - values["ece_eqfreq"]) > 1e-3


def test_equal_frequency_bins_keep_ties_together_whatever_the_row_order():
    # perfectly calibrated but tied: 100 images at 0.7 (70 right), 100 at 0.9 (90 right)
    probs = np.repeat([0.7, 0.9], 100)
    labels = np.concatenate([np.repeat([1, 0], [70, 30]), np.repeat([1, 0], [90, 10])])
    assert metrics.ece(probs, labels, 10, "quantile") == pytest.approx(0.0, abs=1e-12)
    order = np.random.default_rng(0).permutation(200)
    assert metrics.ece(probs[order], labels[order], 10, "quantile") == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(2)
    rounded = np.round(rng.uniform(0.05, 0.95, 300), 1)  # isotonic-like: a few distinct values
    outcome = (rng.uniform(0, 1, 300) < rounded).astype(int)
    shuffled = rng.permutation(300)
    value = metrics.ece(rounded, outcome, 10, "quantile")
    assert value == pytest.approx(metrics.ece(rounded[shuffled], outcome[shuffled], 10, "quantile"), abs=1e-12)
    assert value == pytest.approx(reference_eqfreq_ece(rounded, outcome, 10))


def test_metrics_from_logits_do_not_saturate():
    # p = sigmoid(40), sigmoid(45), sigmoid(50) all round to 1.0: ranked as probabilities they tie
    logits = np.array([40.0, 45.0, 50.0, -3.0])
    labels = np.array([1, 0, 1, 0])
    values = metrics.classification_metrics(logits, labels, n_bootstrap=0)
    assert values["auroc"] == pytest.approx(roc_auc_score(labels, logits)) == pytest.approx(0.75)
    exact = np.mean([np.log1p(np.exp(-40.0)), 45.0 + np.log1p(np.exp(-45.0)), np.log1p(np.exp(-50.0)), np.log1p(np.exp(-3.0))])
    assert values["nll"] == pytest.approx(exact)  # clipped probabilities would cap the wrong answer at 16 nats
    assert metrics.nll(metrics.sigmoid(logits), labels) < values["nll"] - 5


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
    assert metrics.ece(probs, labels, 10, "quantile") == pytest.approx(reference_eqfreq_ece(probs, labels, 10))


def test_class1_confidence_compares_probability_with_positive_rate():
    probs = np.array([0.1, 0.1, 0.9, 0.9])
    labels = np.array([0, 0, 1, 0])
    bins = metrics.calibration_bins(probs, labels, 10, confidence="class1")
    filled = bins.count > 0
    assert bins.accuracy[filled].tolist() == [0.0, 0.5]
    assert metrics.ece(probs, labels, 10, confidence="class1") == pytest.approx(0.5 * 0.1 + 0.5 * 0.4)


def test_mce_is_largest_bin_gap_among_bins_with_enough_samples(scored):
    probs, labels = scored
    populated = [gap for share, gap in reference_gaps(probs, labels, 10) if share * len(labels) >= metrics.MCE_MIN_COUNT]
    assert metrics.mce(probs, labels) == pytest.approx(max(populated))
    assert metrics.mce(probs, labels) > metrics.ece(probs, labels)
    # one badly calibrated bin among good ones: MCE is its gap, not an average
    skewed = np.array([0.95] * 8 + [0.65] * 6)
    outcome = np.array([1] * 8 + [0] * 6)  # 0.65-bin: confidence 0.65, accuracy 0
    assert metrics.mce(skewed, outcome) == pytest.approx(0.65)
    # the same bin with 2 images is below the minimum count: one image would decide its gap
    assert metrics.mce(skewed[:10], outcome[:10]) == pytest.approx(0.05)
    assert metrics.mce(skewed[:10], outcome[:10], min_count=1) == pytest.approx(0.65)
    perfect = np.array([1.0] * 5 + [0.0] * 5)
    assert metrics.mce(perfect, np.array([1] * 5 + [0] * 5)) == 0.0


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate(scored):
    probs, labels = scored
    low, high = metrics.bootstrap_auroc_ci(probs, labels, 500, seed=3)
    assert (low, high) == metrics.bootstrap_auroc_ci(probs, labels, 500, seed=3)
    assert (low, high) != metrics.bootstrap_auroc_ci(probs, labels, 500, seed=4)
    assert low < metrics.auroc(probs, labels) < high and high - low < 0.2
    narrow = metrics.bootstrap_auroc_ci(probs, labels, 500, seed=3, level=0.8)
    assert narrow == pytest.approx(reference_bootstrap_ci(probs, labels, 500, 3, 0.8))
    assert low < narrow[0] < narrow[1] < high


def test_sigmoid_is_stable_for_large_logits():
    out = metrics.sigmoid(np.array([-1000.0, 0.0, 1000.0]))
    assert out.tolist() == [0.0, 0.5, 1.0]
