"""`baseline` end to end on synthetic data: standalone CLI and real `mlflow run` calls."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from entrypoints import baseline
from entrypoints.common import main
from tests.conftest import all_runs, artifact_paths, assert_contract, cli_env, mlflow_run, run_step, save_local_imagenet_weights

FAST = ["--epochs", "2", "--batch-size", "32"]


def download(tracking, run_id, path, tmp_path):
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path), tracking_uri=tracking)


def test_standalone_run_logs_the_contract_and_consistent_metrics(synthetic_root, tracking_uri, tmp_path):
    result = run_step("baseline", ["--dataset", "breastmnist", *FAST], cli_env(synthetic_root, tracking_uri), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test AUROC" in result.stdout
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED"
    assert_contract(tracking_uri, run)
    tags, params = run.data.tags, run.data.params
    assert (tags["stage"], tags["dataset"], tags["model"], tags["seed"], tags["method"]) == ("baseline", "breastmnist", "smallcnn", "0", "supervised")
    assert params["cfg.epochs"] == "2" and len(tags["config_hash"]) == 12
    assert tags["deterministic"] == "false" and int(tags["torch_threads"]) >= 1  # how it computed, for a rerun
    assert mlflow.get_experiment(run.info.experiment_id).name == "breastmnist"

    # Logged metrics agree with an independent recomputation from the logged predictions.
    test = pd.read_csv(download(tracking_uri, run.info.run_id, "predictions/test.csv", tmp_path))
    assert list(test.columns) == ["index", "label", "logit", "prob"]
    assert np.allclose(test.prob, 1 / (1 + np.exp(-test.logit)), atol=1e-6)
    m = run.data.metrics
    assert m["test_auroc"] == pytest.approx(roc_auc_score(test.label, test.prob), abs=1e-6)
    assert m["test_acc"] == pytest.approx(np.mean((test.prob >= 0.5) == test.label), abs=1e-6)
    assert m["test_brier"] == pytest.approx(brier_score_loss(test.label, test.prob), abs=1e-6)
    assert m["test_nll"] == pytest.approx(log_loss(test.label, test.prob), abs=1e-5)
    which = np.minimum((test.prob * 10).astype(int), 9)  # the plan's diagram: p(class 1) in 10 equal-width bins of [0, 1]
    gaps = [abs(test.label[which == b].mean() - test.prob[which == b].mean()) * (which == b).mean() for b in np.unique(which)]
    assert m["test_ece_class1"] == pytest.approx(sum(gaps), abs=1e-6)
    assert m["test_balanced_acc"] == pytest.approx((np.mean(test.prob[test.label == 1] >= 0.5) + np.mean(test.prob[test.label == 0] < 0.5)) / 2, abs=1e-6)
    assert {"plots/reliability.png", "plots/reliability_class1.png", "plots/reliability_class1_eqfreq.png"} <= artifact_paths(tracking_uri, run.info.run_id)
    assert params["mce_min_count"] == "5"
    summary = json.loads(open(download(tracking_uri, run.info.run_id, "test_metrics.json", tmp_path)).read())
    assert summary["auroc"] == pytest.approx(m["test_auroc"])
    epochs = [json.loads(line) for line in open(download(tracking_uri, run.info.run_id, "val_log.jsonl", tmp_path))]
    assert [e["epoch"] for e in epochs] == [1, 2]
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "val_auroc")
    assert [h.step for h in history] == [1, 2]  # one value per epoch: the selected model's is best_val_auroc
    best = epochs[int(m["best_epoch"]) - 1]
    assert m["best_val_auroc"] == pytest.approx(best["val_auroc"]) == history[int(m["best_epoch"]) - 1].value
    val = pd.read_csv(download(tracking_uri, run.info.run_id, "predictions/val.csv", tmp_path))
    assert m["best_val_auroc"] == pytest.approx(roc_auc_score(val.label, val.prob), abs=1e-6)


def test_same_seed_same_test_metrics(synthetic_root, tracking_uri, tmp_path):
    env = cli_env(synthetic_root, tracking_uri)
    for _ in range(2):
        assert run_step("baseline", ["--dataset", "pneumoniamnist", *FAST, "--seed", "3"], env, tmp_path).returncode == 0
    first, second = all_runs(tracking_uri)
    keys = [k for k in first.data.metrics if k.startswith("test_")]
    assert {k: first.data.metrics[k] for k in keys} == {k: second.data.metrics[k] for k in keys}


def test_deterministic_runs_agree_at_one_and_two_threads(synthetic_root, tracking_uri, tmp_path):
    for threads in ("1", "2"):
        env = cli_env(synthetic_root, tracking_uri, OMP_NUM_THREADS=threads)
        result = run_step("baseline", ["--dataset", "breastmnist", *FAST, "--seed", "5", "--deterministic", "true"], env, tmp_path)
        assert result.returncode == 0, result.stderr
    second, first = all_runs(tracking_uri)
    for run in (first, second):
        assert (run.data.tags["torch_threads"], run.data.tags["deterministic"]) == ("1", "true")
    keys = [k for k in first.data.metrics if k.startswith("test_")]
    assert keys and {k: first.data.metrics[k] for k in keys} == {k: second.data.metrics[k] for k in keys}


@pytest.mark.slow
@pytest.mark.parametrize(
    "params",
    [
        {"dataset": "breastmnist", "model": "smallcnn"},
        {"dataset": "pneumoniamnist", "model": "resnet18", "finetune": "head", "stem": "imagenet"},
    ],
)
def test_mlflow_run_finishes_with_the_contract(params, synthetic_root, tracking_uri, tmp_path):
    save_local_imagenet_weights(tmp_path / "torch-home")  # the head-only baseline trains from ImageNet weights (weights=auto)
    env = cli_env(synthetic_root, tracking_uri, TORCH_HOME=str(tmp_path / "torch-home"))
    result = mlflow_run("baseline", {**params, "epochs": "1", "batch_size": "64"}, env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED"
    assert_contract(tracking_uri, run)
    assert run.data.params["epochs"] == "1" and run.data.params["cfg.epochs"] == "1"
    assert run.data.tags["model"] == params["model"]


def test_last_checkpoint_waits_for_the_minimum_interval(synthetic_root, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    for seconds in (0, 1000):
        config = tmp_path / f"min{seconds}.yaml"
        config.write_text(f"checkpoint_every: 1\ncheckpoint_min_seconds: {seconds}\nbootstrap: 0\n")
        main(baseline.command, ["--dataset", "breastmnist", *FAST, "--config", str(config)])
    runs = {run.data.params["cfg.checkpoint_min_seconds"]: run for run in all_runs(tracking_uri)}
    assert "checkpoints/last.pt" in artifact_paths(tracking_uri, runs["0"].info.run_id)  # after epoch 1 of 2
    assert "checkpoints/last.pt" not in artifact_paths(tracking_uri, runs["1000"].info.run_id)
    assert "checkpoints/best.pt" in artifact_paths(tracking_uri, runs["1000"].info.run_id)
