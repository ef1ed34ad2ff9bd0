"""Temperature scaling and the comparison calibrators, on synthetic logits with a known answer."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score

from pipeline.steps import calibrate as calibration
from pipeline.errors import UserError


def overconfident(true_temperature: float, n: int = 4000, seed: int = 0):
    """Labels drawn from sigmoid(z); the model reports z * T, i.e. is off by a temperature T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    return z * true_temperature, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_t):
    logits, labels = overconfident(true_t)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.1)


def test_temperature_lowers_val_nll_keeps_auroc_and_accuracy():
    logits, labels = overconfident(3.0, n=600, seed=1)
    t = calibration.fit_temperature(logits, labels)
    assert t > 0
    before, after = 1 / (1 + np.exp(-logits)), 1 / (1 + np.exp(-logits / t))
    assert log_loss(labels, after) < log_loss(labels, before) - 0.05
    assert roc_auc_score(labels, after) == roc_auc_score(labels, before)
    assert np.array_equal(after >= 0.5, before >= 0.5)
    # The fitted T is the minimum: nudging it either way does not lower the NLL.
    for other in (t * 0.9, t * 1.1):
        assert calibration.nll_at_temperature(logits, labels, t) <= calibration.nll_at_temperature(logits, labels, other)


def test_temperature_stays_positive_and_flags_a_bound_for_useless_logits():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    logits = -5.0 * (2 * labels - 1)  # perfectly wrong: no positive temperature helps
    t = calibration.fit_temperature(logits, labels)
    assert t > 0 and calibration.at_bound(t)
    assert not calibration.at_bound(calibration.fit_temperature(*overconfident(2.0)))


def test_nll_at_temperature_matches_sklearn():
    logits, labels = overconfident(2.0, n=300)
    assert calibration.nll_at_temperature(logits, labels, 1.7) == pytest.approx(log_loss(labels, 1 / (1 + np.exp(-logits / 1.7))), rel=1e-9)


@pytest.mark.parametrize("method", calibration.METHODS)
def test_each_calibrator_maps_logits_to_probabilities_fitted_on_validation(method):
    val_logits, val_labels = overconfident(3.0, n=800, seed=3)
    test_logits, test_labels = overconfident(3.0, n=800, seed=4)
    calibrator = calibration.fit_calibrator(method, val_logits, val_labels)
    probs = calibrator.apply(test_logits)
    assert probs.shape == test_logits.shape and np.all((probs >= 0) & (probs <= 1))
    raw = 1 / (1 + np.exp(-test_logits))
    assert calibration.evaluate(probs, test_labels, 10)["ece"] < calibration.evaluate(raw, test_labels, 10)["ece"]
    if method == "platt":
        assert calibrator.params["platt_slope"] == pytest.approx(1 / 3.0, rel=0.15)


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError, match="calibration method 'beta' is unknown"):
        calibration.fit_calibrator("beta", np.zeros(4), np.array([0, 1, 0, 1]))


def test_metric_keys_name_before_and_after():
    rows = [{"method": m, "split": s, **{k: 0.0 for k in calibration.METRICS}} for m in ("uncalibrated", "temperature") for s in ("val", "test")]
    keys = set(calibration.metric_values(rows))
    assert {"val_nll_before", "val_nll_after", "test_ece_before", "test_ece_after", "test_auroc_after"} <= keys


def test_a_small_temperature_keeps_test_auroc_and_reports_the_exact_nll():
    # separable validation pushes T to its lower bound; on test, z / T exceeds 37, where
    # probabilities round to 1.0: the table must rank and score by the logits
    rng = np.random.default_rng(5)
    val_labels = np.repeat([0, 1], 40)
    val_logits = np.where(val_labels == 1, 1.0, -1.0) + rng.normal(0, 0.1, 80)
    test_labels = rng.integers(0, 2, 200)
    test_logits = (2 * test_labels - 1) * 0.8 + rng.normal(0, 1.0, 200)
    calibrator = calibration.fit_calibrator("temperature", val_logits, val_labels)
    assert calibration.at_bound(calibrator.params["temperature"])
    probs = calibrator.apply(test_logits)
    assert len(np.unique(probs)) < len(test_logits)  # saturated: ties that a probability ranking would see
    before = calibration.evaluate(1 / (1 + np.exp(-test_logits)), test_labels, 10, test_logits)
    after = calibration.evaluate(probs, test_labels, 10, calibrator.logit(test_logits))
    assert after["auroc"] == before["auroc"] == pytest.approx(roc_auc_score(test_labels, test_logits))
    exact = calibration.nll_at_temperature(test_logits, test_labels, calibrator.params["temperature"])
    assert after["nll"] == pytest.approx(exact)
    assert calibration.evaluate(probs, test_labels, 10)["nll"] < exact - 1  # clipped probabilities understate it


def test_platt_logits_match_its_probabilities():
    val_logits, val_labels = overconfident(3.0, n=400, seed=6)
    calibrator = calibration.fit_calibrator("platt", val_logits, val_labels)
    z = np.linspace(-10, 10, 21)
    reference = LogisticRegression(C=1e6, max_iter=1000).fit(val_logits.reshape(-1, 1), val_labels)
    assert calibrator.apply(z) == pytest.approx(reference.predict_proba(z.reshape(-1, 1))[:, 1])
    assert 1 / (1 + np.exp(-calibrator.logit(z))) == pytest.approx(calibrator.apply(z))
    a, b = calibrator.params["platt_slope"], calibrator.params["platt_intercept"]
    assert calibrator.logit(z) == pytest.approx(a * z + b)


def test_the_test_change_has_a_paired_bootstrap_interval_and_a_verdict_from_it():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    overconfident = np.where(labels == 1, 0.99, 0.01)
    overconfident[:100] = 1 - overconfident[:100]  # a quarter confidently wrong
    softened = np.where(overconfident > 0.5, 0.75, 0.25)  # its own accuracy: calibrated
    rows = {r["metric"]: r for r in calibration.calibration_change(overconfident, softened, labels, 10, 300, 0)}
    assert set(rows) == {"ece", "brier", "nll"}
    ece = rows["ece"]
    assert ece["change"] == pytest.approx(ece["after"] - ece["before"]) and ece["change"] < -0.2
    assert ece["ci_low"] <= ece["change"] <= ece["ci_high"] < 0 and ece["verdict"] == "improves"
    same = {r["metric"]: r for r in calibration.calibration_change(softened, softened, labels, 10, 300, 0)}
    assert same["ece"]["change"] == 0 and (same["ece"]["ci_low"], same["ece"]["ci_high"]) == (0, 0)
    assert same["ece"]["verdict"] == "no detectable difference"
