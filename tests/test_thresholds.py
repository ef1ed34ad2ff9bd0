"""Operating points chosen on validation, checked against brute force over every threshold."""

import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

from pipeline import render, writeup
from pipeline.steps import thresholds
from pipeline.source import Predictions


def scores(n: int = 300, seed: int = 0, positive_rate: float = 0.6):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < positive_rate).astype(int)
    logits = rng.normal(1.2 * (2 * labels - 1), 1.5)
    return Predictions(np.arange(n), labels, logits)


def brute_force(probs, labels):
    """Rows (t, TPR, FPR, F1) at every candidate threshold (each distinct score), predicting p >= t."""
    ts = np.unique(probs)
    predicted = probs[None, :] >= ts[:, None]
    positive = labels[None, :] == 1
    tp, fp = (predicted & positive).sum(1), (predicted & ~positive).sum(1)
    fn, tn = (~predicted & positive).sum(1), (~predicted & ~positive).sum(1)
    return np.stack([ts, tp / (tp + fn), fp / (fp + tn), 2 * tp / (2 * tp + fp + fn)], axis=1)


def test_youden_and_max_f1_match_brute_force():
    val = scores()
    table = brute_force(val.probs, val.labels)
    t = thresholds.youden_threshold(val.probs, val.labels)
    j = table[:, 1] - table[:, 2]
    assert j[table[:, 0] == t][0] == pytest.approx(j.max())
    t = thresholds.max_f1_threshold(val.probs, val.labels)
    assert f1_score(val.labels, val.probs >= t) == pytest.approx(table[:, 3].max())


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_target_tpr_is_the_most_specific_threshold_reaching_it(target):
    val = scores()
    point = thresholds.target_tpr_point(val.probs, val.labels, target)
    table = brute_force(val.probs, val.labels)
    reaching = table[table[:, 1] >= target]
    assert point.status == "ok" and point.threshold == reaching[:, 0].max()


@pytest.mark.parametrize("target", [0.05, 0.1, 0.2])
def test_target_fpr_is_the_most_sensitive_threshold_within_it(target):
    val = scores()
    point = thresholds.target_fpr_point(val.probs, val.labels, target)
    table = brute_force(val.probs, val.labels)
    within = table[table[:, 2] <= target]
    assert point.status == "ok" and point.threshold == within[:, 0].min()


def test_unreachable_targets_are_reported_not_clipped():
    val = scores(n=60)  # about 36 positives and 24 negatives
    n_pos, n_neg = int(val.labels.sum()), int((val.labels == 0).sum())
    tpr = thresholds.target_tpr_point(val.probs, val.labels, 0.99)
    assert tpr.status == "unreachable" and math.isnan(tpr.threshold)
    assert f"{n_pos} positives" in tpr.note and ">= 100" in tpr.note
    fpr = thresholds.target_fpr_point(val.probs, val.labels, 0.01)
    assert fpr.status == "unreachable" and f"{n_neg} negatives" in fpr.note
    # Negatives tied with the top score: no threshold other than "call nothing" meets a small FPR.
    tied = Predictions(np.arange(40), np.array([0, 1] * 20), np.r_[np.full(10, 9.0), np.linspace(-3, 3, 30)])
    point = thresholds.target_fpr_point(tied.probs, tied.labels, 0.05)
    assert point.status == "unreachable" and "smallest validation FPR" in point.note
    rows = thresholds.threshold_rows([tpr, fpr], val, scores(seed=1), 50, 0)
    assert [r["status"] for r in rows] == ["unreachable", "unreachable"] and all("tpr" not in r for r in rows)
    assert all(math.isnan(v) for v in thresholds.metric_values(rows).values())


def test_rows_apply_validation_thresholds_to_test_and_match_sklearn():
    val, test = scores(seed=0), scores(seed=1)
    points = thresholds.choose_points(val, [0.9], [0.1])
    rows = thresholds.threshold_rows(points, val, test, n_resamples=200, seed=0)
    assert [r["key"] for r in rows] == ["default", "youden", "max_f1", "tpr90", "fpr10"]
    for row in rows:
        predicted = test.probs >= row["threshold"]
        tn, fp, fn, tp = confusion_matrix(test.labels, predicted, labels=[0, 1]).ravel()
        assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (tp, fp, tn, fn)
        assert row["tpr"] == pytest.approx(tp / (tp + fn))
        assert row["specificity"] == pytest.approx(tn / (tn + fp)) == pytest.approx(1 - row["fpr"])
        assert row["precision"] == pytest.approx(tp / (tp + fp))
        assert row["npv"] == pytest.approx(tn / (tn + fn))
        assert row["f1"] == pytest.approx(f1_score(test.labels, predicted))
        for rate in thresholds.RATES:
            assert row[f"{rate}_ci_low"] <= row[rate] <= row[f"{rate}_ci_high"]
        val_pred = val.probs >= row["threshold"]
        assert row["val_tpr"] == pytest.approx(val_pred[val.labels == 1].mean())
    assert rows[3]["val_tpr"] >= 0.9 and rows[4]["val_fpr"] <= 0.1


def test_positive_class_zero_rates_refer_to_label_zero_and_p_class_0():
    """With class 0 positive, each rule's threshold is on p(class 0) = 1 − p(class 1), and TPR is the share of
    label-0 test images at or above it (FPR of label 1, precision among those called), counted here directly."""
    val, test = scores(seed=0, positive_rate=0.3), scores(seed=1, positive_rate=0.3)  # label 0 is the majority
    rows = thresholds.threshold_rows(
        thresholds.choose_points(thresholds.oriented(val, 0), [0.9], [0.1]), thresholds.oriented(val, 0), thresholds.oriented(test, 0), n_resamples=0, seed=0
    )
    val_p0, test_p0 = 1 - 1 / (1 + np.exp(-val.logits)), 1 - 1 / (1 + np.exp(-test.logits))
    youden = max(np.unique(val_p0), key=lambda t: np.mean(val_p0[val.labels == 0] >= t) - np.mean(val_p0[val.labels == 1] >= t))
    assert rows[1]["threshold"] == pytest.approx(youden, abs=1e-12)
    for row in rows:
        called = test_p0 >= row["threshold"] - 1e-12  # the cut is a validation score: allow the last bit of 1 − p
        assert row["tpr"] == pytest.approx(called[test.labels == 0].mean())
        assert row["fpr"] == pytest.approx(called[test.labels == 1].mean())
        assert row["precision"] == pytest.approx(np.mean(test.labels[called] == 0))
        assert row["npv"] == pytest.approx(np.mean(test.labels[~called] == 1))
        assert row["f1"] == pytest.approx(f1_score(test.labels, ~called, pos_label=0))  # ~called: predicted class 1
        val_called = val_p0 >= row["threshold"] - 1e-12
        assert row["val_tpr"] == pytest.approx(val_called[val.labels == 0].mean())
    assert rows[3]["val_tpr"] >= 0.9 and rows[4]["val_fpr"] <= 0.1


def test_oriented_predictions_flip_labels_and_scores_only_for_class_0():
    test = scores(seed=2)
    assert thresholds.oriented(test, 1) is test
    flipped = thresholds.oriented(test, 0)
    assert np.array_equal(flipped.index, test.index) and np.array_equal(flipped.labels, 1 - test.labels)
    assert flipped.probs == pytest.approx(1 - test.probs, abs=1e-15)
    assert thresholds.positive_text("breastmnist", 0) == "0 (malignant)"
    assert thresholds.positive_text("pneumoniamnist", 1) == "1 (pneumonia)"


def test_draft_sentence_of_a_run_logged_before_positive_class_says_label_1():
    settings = {"source_run_id": "0123456789abcdef", "dataset": "breastmnist", "target_tprs": "0.9", "target_fprs": "0.1", "bootstrap": "10"}
    table = render.Table("week7_thresholds", "thresholds", ["rule"], records=[{"rule": "default 0.5"}], settings=settings)
    assert "(positive class: label 1, normal, benign; TPR and FPR refer to it)" in writeup.posthoc_text({"week7_thresholds": table})[0]
    table.settings = {**settings, "positive_class": "0"}
    assert "(positive class: label 0, malignant; TPR and FPR refer to it)" in writeup.posthoc_text({"week7_thresholds": table})[0]


def test_bootstrap_is_seeded():
    test = scores()
    first = thresholds.bootstrap_rates(test.probs, test.labels, 0.5, 100, seed=3)
    assert first == thresholds.bootstrap_rates(test.probs, test.labels, 0.5, 100, seed=3)
    assert first != thresholds.bootstrap_rates(test.probs, test.labels, 0.5, 100, seed=4)


def test_high_confidence_errors_are_wrong_and_confident_most_confident_first():
    test = scores(seed=5)
    errors = thresholds.high_confidence_errors(test, 0.8)
    probs = test.probs
    expected = np.flatnonzero(((probs >= 0.5) != test.labels) & (np.maximum(probs, 1 - probs) >= 0.8))
    assert sorted(e["index"] for e in errors) == sorted(expected.tolist()) and len(errors) > 0
    assert [e["confidence"] for e in errors] == sorted((e["confidence"] for e in errors), reverse=True)
    assert all(e["predicted"] != e["true"] and e["note"] == e["hypothesis"] == e["possible_fix"] == "" for e in errors)
    assert thresholds.ERROR_COLUMNS == ["index", "true", "predicted", "prob", "note", "hypothesis", "possible_fix"]
