"""`calibrate`, `thresholds` and `robustness` end to end on a real synthetic baseline run.

One baseline run (2 epochs, a subprocess as a user runs it) is made per module; each test works on
its own copy of that store, calls the step in-process through the same `main` wrapper as the
console script, and checks the logged numbers against an independent recomputation from the
source run's logged predictions.
"""

from __future__ import annotations

import csv
import json
import shutil

import mlflow
import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, log_loss, roc_auc_score, roc_curve

from entrypoints import calibrate, robustness, thresholds
from entrypoints.common import main
from pipeline import report, writeup
from pipeline.data import load_arrays
from pipeline.supervised import predictions_csv
from tests.conftest import all_runs, artifact_paths, assert_contract, cli_env, mlflow_run, run_step

COMMANDS = {"calibrate": calibrate.command, "thresholds": thresholds.command, "robustness": robustness.command}


@pytest.fixture(scope="module")
def classifier_store(tmp_path_factory, synthetic_root):
    """A store holding one FINISHED breastmnist baseline run (smallcnn, 2 epochs, dropout 0)."""
    folder = tmp_path_factory.mktemp("classifier-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    args = ["--dataset", "breastmnist", "--epochs", "2", "--batch-size", "32"]
    result = run_step("baseline", args, cli_env(synthetic_root, uri), folder)
    assert result.returncode == 0, result.stderr
    (run,) = all_runs(uri)
    return folder, run.info.run_id


@pytest.fixture()
def store(classifier_store, synthetic_root, tmp_path, monkeypatch):
    """This test's copy of the classifier store, active in-process: (tracking URI, baseline run id)."""
    folder, run_id = classifier_store
    shutil.copy(folder / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri, run_id
    mlflow.set_tracking_uri(None)


def newest(uri: str, stage: str):
    return next(r for r in all_runs(uri) if r.data.tags.get("stage") == stage)


def read_csv(uri: str, run_id: str, path: str, tmp_path) -> dict[str, np.ndarray]:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path), tracking_uri=uri)
    with open(local) as handle:
        rows = list(csv.DictReader(handle))
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def floats(values: np.ndarray) -> np.ndarray:
    return np.array([float(v) if v != "" else np.nan for v in values])


def sigmoid(z):
    return 1 / (1 + np.exp(-np.asarray(z, dtype=float)))


def reference_ece(probs, labels, bins=10):
    """Top-label ECE with equal-width bins (right-closed), written out independently."""
    conf = np.maximum(probs, 1 - probs)
    correct = ((probs >= 0.5) == labels).astype(float)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    return sum(abs(correct[which == b].mean() - conf[which == b].mean()) * np.sum(which == b) for b in range(bins) if np.any(which == b)) / len(probs)


def fake_run(uri: str, **tags: str) -> str:
    """A FINISHED run with the given tags and no artifacts (e.g. a parent run, or another stage)."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("breastmnist").experiment_id
    run = client.create_run(experiment, tags={"model": "smallcnn", "seed": "0", "week": "2", **tags})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def source_predictions(uri, run_id, tmp_path):
    return {s: read_csv(uri, run_id, f"predictions/{s}.csv", tmp_path / s) for s in ("val", "test")}


def check_tags(run, stage: str, source_id: str) -> None:
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert (tags["stage"], tags["dataset"], tags["source_run_id"], tags["model"], tags["seed"]) == (stage, "breastmnist", source_id, "smallcnn", "0")


def test_calibrate_end_to_end(store, tmp_path, capsys):
    uri, source_id = store
    fake_run(uri, dataset="breastmnist", stage="baseline")  # newer, but without predictions: skipped by `latest`
    main(calibrate.command, ["--dataset", "breastmnist", "--methods", "temperature,platt,isotonic"])
    assert "T =" in capsys.readouterr().out
    run = newest(uri, "calibrate")
    check_tags(run, "calibrate", source_id)
    assert_contract(uri, run, classifier=False)
    assert run.data.tags["week"] == "6"
    m = run.data.metrics
    for split in ("val", "test"):
        for metric in ("ece", "ece_eqfreq", "mce", "brier", "nll", "acc", "auroc"):
            for suffix in ("before", "after", "platt", "isotonic"):
                assert f"{split}_{metric}_{suffix}" in m
    assert {"temperature", "platt_slope", "platt_intercept"} <= set(m)
    assert {
        "calibration/table.csv",
        "calibration/table.md",
        "calibration/fitted.json",
        "predictions/val_calibrated.csv",
        "predictions/test_calibrated.csv",
        "calibration/test_probs.csv",
        "plots/reliability_before.png",
        "plots/reliability_after.png",
        "plots/reliability_side_by_side.png",
        "config.yaml",
    } <= artifact_paths(uri, run.info.run_id)

    # Independent recomputation from the source run's logged predictions.
    preds = source_predictions(uri, source_id, tmp_path)
    val_z, val_y = floats(preds["val"]["logit"]), preds["val"]["label"].astype(int)
    test_z, test_y = floats(preds["test"]["logit"]), preds["test"]["label"].astype(int)
    fitted = minimize_scalar(
        lambda s: log_loss(val_y, sigmoid(val_z / np.exp(s)), labels=[0, 1]), bounds=(np.log(0.01), np.log(100)), method="bounded", options={"xatol": 1e-8}
    )
    t = m["temperature"]
    assert t > 0 and t == pytest.approx(np.exp(fitted.x), rel=1e-3)
    assert m["val_nll_after"] <= m["val_nll_before"] + 1e-12
    assert m["val_nll_before"] == pytest.approx(log_loss(val_y, sigmoid(val_z)), abs=1e-6)
    assert m["val_nll_after"] == pytest.approx(log_loss(val_y, sigmoid(val_z / t)), abs=1e-6)
    assert m["test_ece_before"] == pytest.approx(reference_ece(sigmoid(test_z), test_y), abs=1e-9)
    assert m["test_ece_after"] == pytest.approx(reference_ece(sigmoid(test_z / t), test_y), abs=1e-9)
    assert m["test_brier_after"] == pytest.approx(brier_score_loss(test_y, sigmoid(test_z / t)), abs=1e-9)
    assert m["test_auroc_after"] == m["test_auroc_before"] == pytest.approx(roc_auc_score(test_y, sigmoid(test_z)), abs=1e-9)
    assert m["test_acc_after"] == m["test_acc_before"]
    calibrated = read_csv(uri, run.info.run_id, "predictions/test_calibrated.csv", tmp_path / "cal")
    assert list(calibrated) == ["index", "label", "logit", "prob"]
    assert np.allclose(floats(calibrated["prob"]), sigmoid(test_z / t), atol=1e-7)
    val_calibrated = read_csv(uri, run.info.run_id, "predictions/val_calibrated.csv", tmp_path / "val_cal")
    assert np.allclose(floats(val_calibrated["prob"]), sigmoid(val_z / t), atol=1e-7)
    assert val_calibrated["label"].astype(int).tolist() == val_y.tolist()
    table = read_csv(uri, run.info.run_id, "calibration/table.csv", tmp_path / "table")
    assert list(table["method"]) == ["uncalibrated"] * 2 + ["temperature"] * 2 + ["platt"] * 2 + ["isotonic"] * 2
    assert float(table["ece"][3]) == pytest.approx(m["test_ece_after"])


def scaled_predictions_run(uri: str, data_root, val_scale: float, test_scale: float) -> tuple[str, dict]:
    """A classifier run whose logged logits are a noisy score of the true label times a different
    scale on each split, so a fit on validation and a fit on test give different answers."""
    splits = load_arrays("breastmnist", 28, data_root)
    rng = np.random.default_rng(5)
    logits = {}
    for split, scale in (("val", val_scale), ("test", test_scale)):
        labels = splits[split].labels
        logits[split] = scale * ((2 * labels - 1) + rng.normal(0, 1.2, len(labels)))
    run_id = fake_run(uri, dataset="breastmnist", stage="baseline", kind="classifier")
    client = mlflow.MlflowClient(uri)
    for split in ("val", "test"):
        client.log_text(run_id, predictions_csv(logits[split], splits[split].labels), f"predictions/{split}.csv")
    return run_id, {s: (logits[s], splits[s].labels) for s in logits}


def test_calibrators_are_fitted_on_validation_never_test(store, synthetic_root, tmp_path):
    uri, _ = store
    source_id, predictions = scaled_predictions_run(uri, synthetic_root, val_scale=3.0, test_scale=0.7)
    main(calibrate.command, ["--dataset", "breastmnist", "--run-id", source_id, "--methods", "temperature,platt,isotonic"])
    run = newest(uri, "calibrate")
    m = run.data.metrics
    (val_z, val_y), (test_z, test_y) = predictions["val"], predictions["test"]

    def temperature_on(z, y):
        fit = minimize_scalar(lambda s: log_loss(y, sigmoid(z / np.exp(s)), labels=[0, 1]), bounds=(np.log(0.01), np.log(100)), method="bounded", options={"xatol": 1e-8})
        return np.exp(fit.x)

    t_val, t_test = temperature_on(val_z, val_y), temperature_on(test_z, test_y)
    assert abs(np.log(t_val / t_test)) > 1  # the splits disagree, so the check below can tell them apart
    assert m["temperature"] == pytest.approx(t_val, rel=1e-3)
    fitted = json.loads(
        open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="calibration/fitted.json", dst_path=str(tmp_path), tracking_uri=uri)).read()
    )
    assert fitted["temperature_at_bound"] is False
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(val_z.reshape(-1, 1), val_y)
    assert (m["platt_slope"], m["platt_intercept"]) == pytest.approx((platt.coef_[0, 0], platt.intercept_[0]), rel=1e-3)
    assert m["val_nll_after"] < m["val_nll_before"] - 0.05
    assert m["test_nll_platt"] == pytest.approx(log_loss(test_y, platt.predict_proba(test_z.reshape(-1, 1))[:, 1]), rel=1e-6)
    isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(val_z, val_y)
    assert m["test_brier_isotonic"] == pytest.approx(brier_score_loss(test_y, isotonic.predict(test_z)), rel=1e-6)


def test_high_confidence_errors_are_listed_most_confident_first(store, synthetic_root, tmp_path):
    uri, _ = store
    source_id, predictions = scaled_predictions_run(uri, synthetic_root, val_scale=3.0, test_scale=3.0)
    main(thresholds.command, ["--dataset", "breastmnist", "--run-id", source_id, "--confidence", "0.8", "--bootstrap", "0"])
    run = newest(uri, "thresholds")
    test_z, test_y = predictions["test"]
    p = sigmoid(test_z)
    confidence = np.maximum(p, 1 - p)
    wrong = np.flatnonzero(((p >= 0.5) != test_y) & (confidence >= 0.8))
    assert len(wrong) >= 3 and run.data.metrics["high_confidence_errors"] == len(wrong)
    errors = read_csv(uri, run.info.run_id, "thresholds/high_confidence_errors.csv", tmp_path)
    expected = wrong[np.lexsort((wrong, -confidence[wrong]))]  # most confident first
    assert errors["index"].astype(int).tolist() == expected.tolist()
    assert errors["true"].astype(int).tolist() == test_y[expected].tolist()


@pytest.mark.parametrize("given, positive", [([], 0), (["--positive-class", "1"], 1)], ids=["finding", "class1"])
def test_thresholds_end_to_end(given, positive, store, tmp_path, capsys):
    """BreastMNIST's finding (the default) is class 0, malignant: every rule, rate and AP then refers to
    p(class 0) = 1 − p(class 1) and label 0, recomputed here from the source run's class-1 logits."""
    uri, source_id = store
    main(thresholds.command, ["--dataset", "breastmnist", "--target-tprs", "0.9,0.99", "--target-fprs", "0.1", "--confidence", "0.6", "--bootstrap", "200", *given])
    name = {0: "malignant", 1: "normal, benign"}[positive]
    shown = f"{positive} ({name})"
    assert f"positive class {shown}: Youden t =" in capsys.readouterr().out
    run = newest(uri, "thresholds")
    check_tags(run, "thresholds", source_id)
    assert_contract(uri, run, classifier=False)
    assert run.data.tags["positive_class"] == run.data.params["cfg.positive_class"] == str(positive)
    assert {
        "thresholds/table.csv",
        "thresholds/table.md",
        "thresholds/high_confidence_errors.csv",
        "plots/roc.png",
        "plots/pr.png",
        "plots/high_confidence_errors.png",
    } <= artifact_paths(uri, run.info.run_id)
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/thresholds/table.md").startswith(f"Positive class: {shown}.")
    preds = source_predictions(uri, source_id, tmp_path)
    class1_p, test_labels = sigmoid(floats(preds["test"]["logit"])), preds["test"]["label"].astype(int)
    val_p, val_y = sigmoid(floats(preds["val"]["logit"])), preds["val"]["label"].astype(int)
    test_p, test_y = class1_p, test_labels
    if positive == 0:  # the analysis' view: p(positive class) against "is the positive class"
        val_p, val_y, test_p, test_y = 1 - val_p, 1 - val_y, 1 - test_p, 1 - test_y
    table = read_csv(uri, run.info.run_id, "thresholds/table.csv", tmp_path / "table")
    assert set(table["positive_class"]) == {shown}
    (methods,) = writeup.posthoc_text({"week7_thresholds": report.thresholds_table("breastmnist")})  # the draft reads the run's cfg
    assert f"(positive class: label {positive}, {name}; TPR and FPR refer to it)" in methods
    assert list(table["key"]) == ["default", "youden", "max_f1", "tpr90", "tpr99", "fpr10"]
    status = dict(zip(table["key"], table["status"]))
    assert status["tpr99"] == "unreachable" and status["default"] == "ok"
    fpr, tpr, cuts = roc_curve(val_y, val_p, drop_intermediate=False)
    finite = np.isfinite(cuts)
    youden = cuts[finite][np.argmax((tpr - fpr)[finite])]
    assert float(table["threshold"][1]) == pytest.approx(youden, rel=1e-6)
    check_rules_on_validation(table, val_p, val_y)
    m = run.data.metrics
    assert m["test_average_precision"] == pytest.approx(average_precision_score(test_labels, class1_p if positive else 1 - class1_p, pos_label=positive), abs=1e-9)
    for k, key in enumerate(table["key"]):
        if table["status"][k] != "ok":
            assert np.isnan(m[f"threshold_{key}"]) and table["threshold"][k] == "" and table["note"][k]
            continue
        cut = float(table["threshold"][k])
        assert m[f"threshold_{key}"] == pytest.approx(cut)
        tn, fp, fn, tp = confusion_matrix(test_y, test_p >= cut, labels=[0, 1]).ravel()
        expected = {
            "tpr": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "fpr": fp / (fp + tn),
            "precision": tp / (tp + fp) if tp + fp else np.nan,
            "npv": tn / (tn + fn) if tn + fn else np.nan,
            "f1": 2 * tp / (2 * tp + fp + fn),
        }
        for rate, value in expected.items():
            logged = floats(table[rate][k : k + 1])[0]
            assert (np.isnan(value) and np.isnan(logged)) or logged == pytest.approx(value, abs=1e-9), (key, rate)
            assert (np.isnan(value) and np.isnan(m[f"test_{rate}_{key}"])) or m[f"test_{rate}_{key}"] == pytest.approx(value)
    errors = read_csv(uri, run.info.run_id, "thresholds/high_confidence_errors.csv", tmp_path / "errors") if m["high_confidence_errors"] else {"index": np.array([])}
    expected_errors = np.flatnonzero(((class1_p >= 0.5) != test_labels) & (np.maximum(class1_p, 1 - class1_p) >= 0.6))
    assert sorted(errors["index"].astype(int).tolist()) == expected_errors.tolist()
    if len(expected_errors):
        assert list(errors) == ["index", "true", "predicted", "prob", "note", "hypothesis", "possible_fix"]
        assert {*errors["note"], *errors["hypothesis"], *errors["possible_fix"]} == {""}


def val_rates(probs: np.ndarray, labels: np.ndarray, cut: float) -> tuple[float, float, float]:
    """TPR, FPR and F1 of `probs >= cut`, counted directly."""
    called = probs >= cut
    tp, fp = np.sum(called & (labels == 1)), np.sum(called & (labels == 0))
    fn = np.sum(~called & (labels == 1))
    return tp / np.sum(labels == 1), fp / np.sum(labels == 0), 2 * tp / (2 * tp + fp + fn)


def check_rules_on_validation(table: dict[str, np.ndarray], val_p: np.ndarray, val_y: np.ndarray) -> None:
    """Max F1, target TPR and target FPR cuts are the rules' choices among every validation score,
    and the table's val_tpr/val_fpr are the rates they reach there."""
    cuts = np.unique(val_p)
    rates = np.array([val_rates(val_p, val_y, c) for c in cuts])
    row = {key: k for k, key in enumerate(table["key"])}
    assert {table["status"][row[k]] for k in ("max_f1", "tpr90", "fpr10")} == {"ok"}
    logged = {key: float(table["threshold"][row[key]]) for key in ("max_f1", "tpr90", "fpr10")}
    # each cut is a validation score; snap to it so a last-bit sigmoid difference cannot flip `>=`
    chosen = {key: cuts[np.argmin(np.abs(cuts - cut))] for key, cut in logged.items()}
    assert all(chosen[key] == pytest.approx(cut, abs=1e-12) for key, cut in logged.items())
    for key, cut in chosen.items():
        tpr, fpr, _ = val_rates(val_p, val_y, cut)
        assert float(table["val_tpr"][row[key]]) == pytest.approx(tpr) and float(table["val_fpr"][row[key]]) == pytest.approx(fpr)
    assert val_rates(val_p, val_y, chosen["max_f1"])[2] == pytest.approx(rates[:, 2].max())
    assert val_rates(val_p, val_y, chosen["tpr90"])[0] >= 0.9
    assert np.all(rates[cuts > chosen["tpr90"], 0] < 0.9)  # no stricter cut still reaches TPR 0.9
    assert val_rates(val_p, val_y, chosen["fpr10"])[1] <= 0.1
    assert np.all(rates[cuts < chosen["fpr10"], 1] > 0.1)  # no looser cut still keeps FPR within 0.1


def test_robustness_end_to_end(store, tmp_path, capsys):
    uri, source_id = store
    main(robustness.command, ["--dataset", "breastmnist", "--severities", "1,3", "--mc-passes", "4", "--device", "cpu"])
    assert "MC dropout enabled at the head input with p = 0.2" in capsys.readouterr().out
    run = newest(uri, "robustness")
    check_tags(run, "robustness", source_id)
    assert_contract(uri, run, classifier=False)
    assert "p = 0.2" in run.data.tags["mc_dropout"]
    assert run.data.params["mc_dropout_p_used"] == "0.2" and run.data.params["cfg.mc_passes"] == "4"
    assert not {"mc_dropout_p", "mc_passes"} & set(run.data.metrics)  # settings are params, not metrics
    assert {
        "robustness/table.csv",
        "robustness/table.md",
        "robustness/mc_dropout.csv",
        "robustness/week8_note.md",
        "plots/robustness.png",
        "plots/mc_dropout_entropy.png",
        "plots/corruption_examples.png",
    } <= artifact_paths(uri, run.info.run_id)
    m = run.data.metrics
    preds = source_predictions(uri, source_id, tmp_path)
    test_p, test_y = sigmoid(floats(preds["test"]["logit"])), preds["test"]["label"].astype(int)
    assert m["clean_logit_max_abs_diff"] < 1e-4, "the checkpoint reproduces the logged test predictions"
    assert m["clean_test_auroc"] == pytest.approx(roc_auc_score(test_y, test_p), abs=1e-6)
    assert m["clean_test_ece"] == pytest.approx(reference_ece(test_p, test_y), abs=1e-5)
    table = read_csv(uri, run.info.run_id, "robustness/table.csv", tmp_path / "table")
    assert len(table["corruption"]) == 1 + 4 * 2 and list(table["severity"][:3]) == ["0", "1", "3"]
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "contrast_auroc")
    assert [h.step for h in history] == [1, 3]
    mc = read_csv(uri, run.info.run_id, "robustness/mc_dropout.csv", tmp_path / "mc")
    prob, entropy, error = floats(mc["prob"]), floats(mc["entropy"]), mc["error"].astype(int)
    assert np.allclose(entropy, -(prob * np.log(prob) + (1 - prob) * np.log(1 - prob)), atol=1e-9)
    assert np.array_equal(error, ((prob >= 0.5) != test_y).astype(int))
    if 0 < error.sum() < len(error):  # entropy and confidence scored against the same errors
        assert m["mc_error_auroc_entropy"] == pytest.approx(roc_auc_score(error, entropy), abs=1e-9)
        assert m["mc_error_auroc_confidence"] == pytest.approx(roc_auc_score(error, 1 - np.maximum(prob, 1 - prob)), abs=1e-9)
    wrong = (test_p >= 0.5) != test_y
    if 0 < wrong.sum() < len(wrong):
        assert m["error_auroc_confidence"] == pytest.approx(roc_auc_score(wrong, 1 - np.maximum(test_p, 1 - test_p)), abs=1e-9)
    note = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/robustness/week8_note.md")
    assert f"AUROC {m['clean_test_auroc']:.3f}" in note and source_id in note
    ece = floats(table["ece"])
    k = 1 + int(np.argmax(ece[1:]))  # the note cites the highest corrupted ECE, not the lowest-AUROC row's
    expected = f"up to {ece[k]:.3f} under {table['corruption'][k]} at severity {table['severity'][k]}" if ece[k] > ece[0] else f"at most {ece[k]:.3f} corrupted"
    assert expected in note


def assert_one_clear_line(exit_info, stderr: str, step: str, fragment: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_info.value.code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith(f"medmnist-ssl {step}: error:") and fragment in lines[0], stderr
    assert "Traceback" not in stderr


BAD_PARAMETERS = [
    ("calibrate", ["--methods", "beta"], "methods=['beta'] must be a non-empty list of temperature, platt, isotonic"),
    ("calibrate", ["--methods", "platt"], "including temperature"),
    ("thresholds", ["--target-tprs", "0.9,1.5"], "target_tprs=[0.9, 1.5] must be a list of rates in (0, 1)"),
    ("thresholds", ["--confidence", "0.2"], "confidence=0.2 must be in [0.5, 1]"),
    ("thresholds", ["--positive-class", "2"], "positive_class='2' must be 0, 1 or finding"),
    ("robustness", ["--severities", "1,7"], "severities=[1, 7] must be a non-empty list of 1, 2, 3, 4, 5"),
    ("robustness", ["--mc-passes", "1"], "mc_passes=1 must be >= 2"),
    ("robustness", ["--mc-dropout-p", "1"], "mc_dropout_p=1.0 must be in (0, 1)"),
    ("robustness", ["--corruptions", "fog"], "corruptions=['fog'] must be a non-empty list"),
]


@pytest.mark.parametrize("step, args, fragment", BAD_PARAMETERS, ids=[f"{s}-{a[0]}-{a[1]}" for s, a, _ in BAD_PARAMETERS])
def test_bad_parameters_log_nothing(step, args, fragment, store, capsys):
    uri, _ = store
    before = len(all_runs(uri))
    with pytest.raises(SystemExit) as exit_info:
        main(COMMANDS[step], ["--dataset", "breastmnist", *args])
    assert_one_clear_line(exit_info, capsys.readouterr().err, step, fragment)
    assert len(all_runs(uri)) == before


SOURCES = {
    "missing": (lambda uri: "0123456789abcdef0123456789abcdef", "was not found in the tracking store"),
    "other_dataset": (lambda uri: fake_run(uri, dataset="pneumoniamnist", stage="baseline"), "is a pneumoniamnist run, not breastmnist"),
    "no_predictions": (lambda uri: fake_run(uri, dataset="breastmnist", stage="baseline"), "has no predictions/val.csv and predictions/test.csv"),
    "not_a_classifier": (lambda uri: fake_run(uri, dataset="breastmnist", stage="eda"), "is a eda run; expected baseline or"),
}


@pytest.mark.parametrize("step", COMMANDS)
@pytest.mark.parametrize("case", SOURCES)
def test_bad_source_runs_log_nothing(case, step, store, capsys):
    uri, _ = store
    make, fragment = SOURCES[case]
    run_id = make(uri)
    before = len(all_runs(uri))
    with pytest.raises(SystemExit) as exit_info:
        main(COMMANDS[step], ["--dataset", "breastmnist", "--run-id", run_id])
    assert_one_clear_line(exit_info, capsys.readouterr().err, step, fragment)
    assert len(all_runs(uri)) == before


def test_latest_without_any_classifier_run(synthetic_root, tracking_uri, monkeypatch, capsys):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    all_runs(tracking_uri)  # create the empty store first: MLflow logs its table creation once
    capsys.readouterr()
    for step, command in COMMANDS.items():
        with pytest.raises(SystemExit) as exit_info:
            main(command, ["--dataset", "breastmnist"])
        assert_one_clear_line(exit_info, capsys.readouterr().err, step, "no FINISHED baseline or ssl_finetune")
    assert all_runs(tracking_uri) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "step, params",
    [
        ("calibrate", {"methods": "temperature,platt"}),
        ("thresholds", {"target_tprs": "0.9", "bootstrap": "100", "positive_class": "finding"}),
        ("robustness", {"severities": "1,2,3", "mc_passes": "5", "device": "cpu"}),
    ],
)
def test_mlflow_run_finishes(step, params, store, synthetic_root, tmp_path):
    uri, source_id = store
    result = mlflow_run(step, {"dataset": "breastmnist", **params}, cli_env(synthetic_root, uri), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = newest(uri, step)
    check_tags(run, step, source_id)
    assert run.data.params["run_id"] == "latest"
    assert all(run.data.params[k] == v for k, v in params.items())
