"""ssl_pretrain → linear_probe → ssl_finetune end to end on synthetic data, chained by `latest`
and by run id, in-process through the CLI wrapper and through real `mlflow run` calls."""

import io
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights

from entrypoints import linear_probe, ssl_finetune, ssl_pretrain
from entrypoints.common import main
from pipeline.steps import linear_probe as pipeline_linear_probe
from pipeline.steps import ssl_finetune as pipeline_ssl_finetune
from pipeline.data import load_arrays, stratified_subset
from pipeline.models import ModelSpec, build_classifier
from tests.conftest import all_runs, artifact_paths, assert_contract, cli_env, mlflow_run

PRETRAIN = ["--steps", "6", "--knn-every", "3", "--batch-size", "32"]
PROBE = ["--label-fractions", "0.1,1", "--seeds", "0,1", "--epochs", "1", "--batch-size", "32"]


@pytest.fixture()
def offline_torch_home(tmp_path, monkeypatch):
    """No ImageNet weights on disk and no network: the ImageNet probe cannot run."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for proxy in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")


@pytest.fixture()
def data_env(synthetic_root, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))


def stage_runs(tracking_uri, stage, parents_only=False):
    runs = [r for r in all_runs(tracking_uri) if r.data.tags.get("stage") == stage]
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags] if parents_only else runs


def read_artifact(tracking_uri, run_id, path, tmp_path):
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path), tracking_uri=tracking_uri)
    return open(local).read()


def test_pretrain_probe_finetune_chain(data_env, synthetic_root, tracking_uri, offline_torch_home, tmp_path, capsys):
    main(ssl_pretrain.command, ["--dataset", "breastmnist", "--method", "simclr", *PRETRAIN])
    (ssl,) = stage_runs(tracking_uri, "ssl_pretrain")
    assert ssl.info.status == "FINISHED" and ssl.data.tags["method"] == "simclr"
    assert_contract(tracking_uri, ssl, classifier=False)
    assert {"ssl_loss", "lr", "knn_val_auroc", "knn_val_acc"} <= set(ssl.data.metrics)
    knn = mlflow.MlflowClient(tracking_uri).get_metric_history(ssl.info.run_id, "knn_val_auroc")
    assert sorted(m.step for m in knn) == [0, 3, 6]  # step 0: the random initialisation
    assert ssl.data.params["total_steps"] == "6"
    assert {"ssl_config.json", "plots/ssl_loss.png", "checkpoints/encoder.pt", "config.yaml"} <= artifact_paths(tracking_uri, ssl.info.run_id)
    settings = json.loads(read_artifact(tracking_uri, ssl.info.run_id, "ssl_config.json", tmp_path))
    assert settings["temperature"] == 0.2 and "random_resized_crop" in settings["augmentations"]

    main(linear_probe.command, ["--dataset", "breastmnist", "--methods", "ssl_probe,supervised,imagenet_probe", *PROBE])
    out = capsys.readouterr().out
    assert "ImageNet probe: not run: ImageNet weights for resnet18 are not available offline" in out
    (parent,) = stage_runs(tracking_uri, "linear_probe", parents_only=True)
    children = [r for r in stage_runs(tracking_uri, "linear_probe") if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["source_run_id"] == ssl.info.run_id
    assert len(children) == 2 * 2 * 2  # fractions × seeds × runnable methods
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["kind"] == "classifier"
        assert {"method", "label_fraction", "seed"} <= set(child.data.tags) and child.data.tags["ssl_method"] == "simclr"
        assert child.info.run_name.startswith(f"{child.data.tags['method']}-simclr-f")  # two grids' rows never share a name
        assert child.data.params["cfg.size"] == "28"  # robustness and thresholds rebuild the test images at this size
        assert_contract(tracking_uri, child, classifier=child.data.tags["method"] == "supervised")
    train_labels = load_arrays("breastmnist", 28, synthetic_root)["train"].labels
    for child in children:  # every method of a (fraction, seed) trains on that stratified subset
        fraction, seed = float(child.data.tags["label_fraction"]), int(child.data.tags["seed"])
        assert child.data.metrics["n_train"] == len(stratified_subset(train_labels, fraction, seed))
    assert {c.data.metrics["n_train"] for c in children} == {len(stratified_subset(train_labels, 0.1, 0)), len(train_labels)}
    supervised = [c for c in children if c.data.tags["method"] == "supervised"]
    assert {c.data.params["cfg.augment"] for c in supervised} == {"flip"}  # as ssl_finetune trains, for week 6
    probe_child = next(c for c in children if c.data.tags["method"] == "ssl_probe")
    assert "best_epoch" not in probe_child.data.metrics and all("best_epoch" in c.data.metrics for c in supervised)  # a probe has no epochs
    assert probe_child.data.tags["source_run_id"] == ssl.info.run_id
    assert {"predictions/test.csv", "checkpoints/best.pt", "plots/reliability.png"} <= artifact_paths(tracking_uri, probe_child.info.run_id)

    # The parent's table agrees with its children.
    table = pd.read_csv(pd.io.common.StringIO(read_artifact(tracking_uri, parent.info.run_id, "label_efficiency.csv", tmp_path)))
    for _, row in table[(table.status == "ok") & (table.method != "majority_class")].iterrows():
        members = [c for c in children if c.data.tags["method"] == row.method and float(c.data.tags["label_fraction"]) == row.label_fraction]
        values = [c.data.metrics["test_auroc"] for c in members]
        assert row.n == len(members) == 2
        assert row.test_auroc_mean == pytest.approx(sum(values) / 2)
        assert set(row.run_ids.split()) == {c.info.run_id for c in members}
    assert set(table[table.status != "ok"].method) == {"imagenet_probe"}
    test_labels = load_arrays("breastmnist", 28, synthetic_root)["test"].labels
    for _, row in table[table.method == "majority_class"].iterrows():  # the control: each subset's majority label
        majorities = [np.bincount(train_labels[stratified_subset(train_labels, row.label_fraction, seed)]).argmax() for seed in (0, 1)]
        assert row.test_acc_mean == pytest.approx(np.mean([np.mean(test_labels == m) for m in majorities]))
        assert row.test_auroc_mean == 0.5 and row.test_balanced_acc_mean == 0.5
    markdown = read_artifact(tracking_uri, parent.info.run_id, "label_efficiency.md", tmp_path)
    assert "ImageNet probe: not run" in markdown
    assert f"Test prevalence of class 1: {test_labels.mean():.3f}" in markdown
    assert f"subset seed 1 → encoder {ssl.info.run_id[:8]}" in markdown
    assert {"plots/label_efficiency_acc.png", "plots/label_efficiency_auroc.png"} <= artifact_paths(tracking_uri, parent.info.run_id)

    dropout = tmp_path / "dropout.yaml"
    dropout.write_text("dropout: 0.25\n")
    main(
        ssl_finetune.command,
        [
            "--dataset",
            "breastmnist",
            "--ssl-run-id",
            ssl.info.run_id,
            "--label-fractions",
            "1",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--encoder-lr-scale",
            "0.1",
            "--config",
            str(dropout),
        ],
    )
    (ft_parent,) = stage_runs(tracking_uri, "ssl_finetune", parents_only=True)
    (ft_child,) = [r for r in stage_runs(tracking_uri, "ssl_finetune") if "mlflow.parentRunId" in r.data.tags]
    assert ft_parent.info.status == ft_child.info.status == "FINISHED"
    assert ft_child.data.params["cfg.size"] == "28" and ft_child.data.params["cfg.dropout"] == "0.25"
    local = mlflow.artifacts.download_artifacts(run_id=ft_child.info.run_id, artifact_path="checkpoints/best.pt", dst_path=str(tmp_path), tracking_uri=tracking_uri)
    tuned = torch.load(local, weights_only=True)
    assert tuned["spec"]["dropout"] == 0.25  # the encoder came without dropout
    pretrained = torch.load(
        mlflow.artifacts.download_artifacts(run_id=ssl.info.run_id, artifact_path="checkpoints/encoder.pt", dst_path=str(tmp_path / "ssl"), tracking_uri=tracking_uri),
        weights_only=True,
    )["state_dict"]
    fresh = build_classifier(ModelSpec("smallcnn")).state_dict()
    convs = [k for k in pretrained if k.startswith("encoder.") and k.endswith(".weight") and pretrained[k].dim() == 4]

    def distance(a, b):
        return sum((a[k] - b[k]).abs().mean().item() for k in convs)

    # one epoch at encoder lr 1e-4 moves the SSL weights a little; a fresh encoder would be far away
    assert distance(tuned["state_dict"], pretrained) < 0.05 * distance(fresh, pretrained)
    assert_contract(tracking_uri, ft_child)
    week6 = read_artifact(tracking_uri, ft_parent.info.run_id, "week6_comparison.md", tmp_path)
    assert "SSL fine-tune" in week6 and "SSL linear probe" in week6 and "supervised only" in week6

    # a grid of encoder lr scales: each fraction's scale is chosen on validation, then used for every seed
    main(
        ssl_finetune.command,
        [
            "--dataset",
            "breastmnist",
            "--ssl-run-id",
            ssl.info.run_id,
            "--label-fractions",
            "0.5",
            "--seeds",
            "0,1",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--encoder-lr-scale",
            "0.1,1",
        ],
    )
    grid = stage_runs(tracking_uri, "ssl_finetune", parents_only=True)[0]
    (selection,) = json.loads(read_artifact(tracking_uri, grid.info.run_id, "encoder_lr_scale_selection.json", tmp_path / "sel"))
    scores = {scale: selection[f"val_auroc_scale_{scale:g}"] for scale in (0.1, 1.0)}
    assert selection["chosen"] == max(scores, key=scores.get) and selection["seed"] == 0
    grid_children = [r for r in stage_runs(tracking_uri, "ssl_finetune") if r.data.tags.get("mlflow.parentRunId") == grid.info.run_id]
    assert {c.data.params["cfg.encoder_lr_scale"] for c in grid_children} == {str(selection["chosen"])}
    assert len(grid_children) == 2


def test_imagenet_probe_runs_with_local_weights(data_env, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), target)
    main(ssl_pretrain.command, ["--dataset", "breastmnist", "--epochs", "1", "--batch-size", "32"])
    main(linear_probe.command, ["--dataset", "breastmnist", "--methods", "imagenet_probe", "--label-fractions", "1", "--seeds", "0"])
    (child,) = [r for r in stage_runs(tracking_uri, "linear_probe") if "mlflow.parentRunId" in r.data.tags]
    assert child.data.tags["method"] == "imagenet_probe" and child.data.tags["model"] == "resnet18"
    assert child.info.status == "FINISHED" and "test_auroc" in child.data.metrics


def test_probe_without_pretraining_says_what_to_run_first(data_env, tracking_uri, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(linear_probe.command, ["--dataset", "breastmnist"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "no FINISHED ssl_pretrain run for breastmnist" in err and "mlflow run . -e ssl_pretrain" in err
    assert all_runs(tracking_uri) == []


def test_probe_refuses_an_ssl_run_of_another_dataset(data_env, tracking_uri, capsys):
    main(ssl_pretrain.command, ["--dataset", "pneumoniamnist", "--epochs", "1", "--batch-size", "32"])
    (ssl,) = all_runs(tracking_uri)
    with pytest.raises(SystemExit):
        main(linear_probe.command, ["--dataset", "breastmnist", "--ssl-run-id", ssl.info.run_id])
    assert f"run {ssl.info.run_id} is a pneumoniamnist run, not breastmnist" in capsys.readouterr().err
    assert len(all_runs(tracking_uri)) == 1


@pytest.mark.slow
def test_mlflow_run_chain_by_latest(synthetic_root, tracking_uri, tmp_path):
    env = cli_env(synthetic_root, tracking_uri, TORCH_HOME=str(tmp_path / "th"), https_proxy="http://127.0.0.1:9")
    result = mlflow_run("ssl_pretrain", {"method": "moco", "epochs": "2", "batch_size": "32", "queue_size": "64"}, env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = mlflow_run("linear_probe", {"label_fractions": "1", "seeds": "0", "methods": "ssl_probe", "epochs": "1"}, env, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (ssl,) = stage_runs(tracking_uri, "ssl_pretrain")
    (parent,) = stage_runs(tracking_uri, "linear_probe", parents_only=True)
    assert ssl.data.tags["method"] == "moco" and ssl.data.params["cfg.queue_size"] == "64"
    assert parent.info.status == "FINISHED" and parent.data.tags["source_run_id"] == ssl.info.run_id
    assert parent.data.params["ssl_run_id"] == "latest"


def interrupted_pretraining(monkeypatch, args, step):
    """Run ssl_pretrain with a Ctrl-C as optimizer step `step` starts; returns the SystemExit it ends with."""
    import pipeline.pretrain as loop

    real_step = loop.StepTrainer.step
    taken = []

    def interrupt(self, view1, view2, index):
        taken.append(1)
        if len(taken) == step:
            raise KeyboardInterrupt("simulated Ctrl-C")
        return real_step(self, view1, view2, index)

    with monkeypatch.context() as patch:
        patch.setattr(loop.StepTrainer, "step", interrupt)
        with pytest.raises(SystemExit) as exit_info:
            main(ssl_pretrain.command, args)
    return exit_info.value


def test_interrupted_pretraining_resumes_mid_epoch_to_the_same_result(data_env, tracking_uri, monkeypatch, tmp_path):
    config = tmp_path / "short.yaml"  # 96 images at batch 32: 3 steps an epoch, so step 4 is mid-epoch
    config.write_text("steps: 8\nknn_every: 2\ncheckpoint_every: 4\ncheckpoint_min_seconds: 0\nbatch_size: 32\nmethod: moco\nqueue_size: 64\n")
    args = ["--dataset", "breastmnist", "--config", str(config)]
    main(ssl_pretrain.command, args)
    (reference,) = all_runs(tracking_uri)

    assert interrupted_pretraining(monkeypatch, args, step=6).code == 130
    interrupted = all_runs(tracking_uri)[0]
    assert interrupted.info.status == "KILLED"

    main(ssl_pretrain.command, ["--dataset", "breastmnist", "--resume", interrupted.info.run_id])
    client = mlflow.MlflowClient(tracking_uri)
    resumed = client.get_run(interrupted.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed_from_step"] == "4"
    for key, steps in (("ssl_loss", [2, 4, 6, 8]), ("knn_val_auroc", [0, 2, 4, 6, 8])):
        history = client.get_metric_history(resumed.info.run_id, key)
        expected = client.get_metric_history(reference.info.run_id, key)
        assert sorted(m.step for m in history) == steps
        assert sorted((m.step, m.value) for m in history) == sorted((m.step, m.value) for m in expected)
    assert resumed.data.params["total_steps"] == "8" and resumed.data.params["steps_per_epoch"] == "3"


def test_a_damaged_training_state_is_refused_before_the_run_reopens(data_env, tracking_uri, monkeypatch, tmp_path, capsys):
    config = tmp_path / "short.yaml"
    config.write_text("steps: 4\nknn_every: 1\ncheckpoint_every: 1\ncheckpoint_min_seconds: 0\nbatch_size: 32\n")
    interrupted_pretraining(monkeypatch, ["--dataset", "breastmnist", "--config", str(config)], step=3)
    (run,) = all_runs(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    local = client.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path))
    saved = torch.load(local, weights_only=True)
    stepless = {**saved, "train_state": {k: v for k, v in saved["train_state"].items() if k != "step"}}  # an epoch-budgeted version's
    no_optimizer = {**saved, "train_state": {**saved["train_state"], "optimizer": {}}}
    for damaged, fragment in [
        (stepless, "holds no step-budgeted training state; start a new run instead"),
        (no_optimizer, "holds a training state this run cannot continue from"),
    ]:
        torch.save(damaged, local)
        client.log_artifact(run.info.run_id, local, "checkpoints")
        with pytest.raises(SystemExit) as exit_info:
            main(ssl_pretrain.command, ["--dataset", "breastmnist", "--resume", run.info.run_id])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and fragment in err and "Traceback" not in err, err
        assert client.get_run(run.info.run_id).info.status == "KILLED"  # refused before the run was reopened


def test_week6_baseline_rows_keep_recipes_apart_and_count_each_seed_once(tracking_uri):
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment("week6-baselines")
    started = []

    def baseline_run(seed: str, auroc: float, **settings: str) -> str:
        started.append(1_700_000_000_000 + 1000 * len(started))  # distinct start times: a definite newest
        run = client.create_run(
            experiment,
            start_time=started[-1],
            tags={"dataset": "breastmnist", "stage": "baseline", "kind": "classifier", "model": "resnet18", "finetune": "all", "seed": seed},
        )
        recipe = {"stem": "cifar", "weights": "none", "epochs": "50", "augment": "none", "lr": "0.001", "size": "28", "seed": seed, "device": "cpu", **settings}
        for key, value in recipe.items():
            client.log_param(run.info.run_id, f"cfg.{key}", value)
        for key in ("test_acc", "test_auroc", "test_ece"):
            client.log_metric(run.info.run_id, key, auroc)
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    baseline_run("0", 0.80)
    imagenet = baseline_run("0", 0.95, stem="imagenet", weights="imagenet")
    tiny_lr = baseline_run("1", 0.50, lr="1e-07")  # another recipe that reads the same but for its lr
    rerun = baseline_run("0", 0.82, device="cuda")  # the same recipe and seed again: only the newest counts
    other_seed = baseline_run("1", 0.84)
    rows, _ = pipeline_ssl_finetune.comparison_rows("breastmnist", "no-such-ssl-run")
    groups = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row["run_id"])
    assert sorted(groups.values()) == sorted([[other_seed, rerun], [tiny_lr], [imagenet]])
    labels = {run_ids[0]: label for label, run_ids in groups.items()}
    assert labels[other_seed].startswith("baseline resnet18/cifar (all, 50 epochs, augment none; recipe ")
    assert labels[imagenet].startswith("baseline resnet18/imagenet, ImageNet weights (all, 50 epochs, augment none; recipe ")
    assert labels[tiny_lr] != labels[other_seed]


def test_a_failed_probe_child_fails_the_grid_after_the_others_finish(data_env, tracking_uri, monkeypatch, capsys):
    # the grids' one failure policy: the failed child is FAILED with its reason, the grid goes on,
    # its table holds what finished, and the parent ends FAILED naming the failed child
    main(ssl_pretrain.command, ["--dataset", "breastmnist", *PRETRAIN])
    real = pipeline_linear_probe.supervised_member

    def diverge_on_seed_1(data, spec, subset, cfg, seed, fraction, device):
        member = real(data, spec, subset, cfg, seed, fraction, device)
        if seed == 1 and fraction == 1.0:  # trained with seed 0 in one group (group_members: true by default)
            with torch.no_grad():
                member.model.head.bias.fill_(float("nan"))
        return member

    monkeypatch.setattr(pipeline_linear_probe, "supervised_member", diverge_on_seed_1)
    with pytest.raises(SystemExit) as exit_info:
        main(linear_probe.command, ["--dataset", "breastmnist", "--methods", "ssl_probe,supervised", *PROBE])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "1 of 8 linear_probe child runs failed: supervised-f1-s1 (DivergenceError" in err
    runs = stage_runs(tracking_uri, "linear_probe")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status == "FAILED" and "supervised-f1-s1" in parent.data.tags["failure_reason"]
    assert sorted(r.info.status for r in children) == ["FAILED"] + ["FINISHED"] * 7  # the ones after it still ran
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/label_efficiency.csv")))
    supervised = table[(table.method == "supervised") & (table.label_fraction == 1.0)]
    assert supervised.n.tolist() == [1]  # the finished seed only
