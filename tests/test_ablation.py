"""`augment_ablation` (parent + nested children, aggregation, failure) and `finetune_table`."""

import math

import mlflow
import pandas as pd
import pytest
import torch

from entrypoints import augment_ablation, baseline
from entrypoints.cli import cli
from entrypoints.common import main
from pipeline import augment
from pipeline.steps.augment_ablation import summary_markdown
from pipeline.results import ablation_summary
from tests.conftest import all_runs, artifact_paths, assert_contract, cli_env, mlflow_run


def download(tracking, run_id, path, tmp_path):
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path), tracking_uri=tracking)


@pytest.fixture()
def fast_config(tmp_path):
    path = tmp_path / "fast.yaml"
    path.write_text("epochs: 1\nbatch_size: 32\nbootstrap: 0\n")
    return str(path)


def row(variant, seed, value):
    return {"variant": variant, "seed": seed, "val_auroc": value, "val_acc": 0.5, "test_auroc": value + 0.1, "test_acc": 0.5, "test_ece": 0.1}


def test_aggregate_mean_and_sample_std_per_variant():
    rows = [row("flip", 0, 0.6), row("none", 0, 0.7), row("flip", 1, 0.8), row("flip", 2, 0.7)]
    none, flip = ablation_summary(rows, ["none", "flip", "geometric"])  # no rows for geometric: left out
    assert (flip["variant"], flip["n"]) == ("flip", 3)
    assert flip["val_auroc_mean"] == pytest.approx(0.7)
    assert flip["val_auroc_std"] == pytest.approx(0.1)  # sample std (ddof=1) of 0.6, 0.8, 0.7
    assert flip["test_auroc_values"] == pytest.approx([0.7, 0.9, 0.8])
    assert (none["n"], none["val_auroc_mean"]) == (1, 0.7) and math.isnan(none["val_auroc_std"])
    table = summary_markdown([none, flip], "t")
    assert "| flip | 3 | 0.700 ± 0.100 |" in table and "| none | 1 | 0.700 |" in table


def test_ablation_parent_and_children(synthetic_root, tracking_uri, monkeypatch, capsys, fast_config, tmp_path):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    main(augment_ablation.command, ["--config", fast_config, "--variants", "none,geometric+intensity", "--seed", "4"])
    assert "geometric+intensity" in capsys.readouterr().out
    runs = all_runs(tracking_uri)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert_contract(tracking_uri, parent, classifier=False)
    assert (parent.data.tags["stage"], parent.data.tags["week"], parent.data.tags["seed"]) == ("augment_ablation", "3", "4")
    assert sorted(c.data.tags["augment"] for c in children) == ["geometric+intensity", "none"]
    for child in children:
        assert_contract(tracking_uri, child)
        tags = child.data.tags
        assert (tags["stage"], tags["method"], tags["model"], tags["seed"]) == ("augment_ablation", "supervised", "smallcnn", "4")
        assert child.data.params["cfg.augment"] == tags["augment"]
    assert {"ablation.csv", "ablation.md", "ablation_runs.json", "plots/ablation_test_auroc.png"} <= artifact_paths(tracking_uri, parent.info.run_id)
    table = pd.read_csv(download(tracking_uri, parent.info.run_id, "ablation.csv", tmp_path))
    assert table.variant.tolist() == ["none", "geometric+intensity"] and table.n.tolist() == [1, 1]
    by_variant = {c.data.tags["augment"]: c.data.metrics for c in children}
    for _, line in table.iterrows():
        assert line.test_auroc_mean == pytest.approx(by_variant[line.variant]["test_auroc"], abs=1e-5)
        assert parent.data.metrics[f"{line.variant.replace('+', '_')}/val_acc_mean"] == pytest.approx(line.val_acc_mean, abs=1e-5)


def test_a_failed_child_fails_the_parent_and_keeps_finished_children(synthetic_root, tracking_uri, monkeypatch, capsys, fast_config):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    monkeypatch.setitem(augment.PRESETS, "flip", lambda images, generator: images * torch.nan)  # diverges
    with pytest.raises(SystemExit) as exit_info:
        main(augment_ablation.command, ["--config", fast_config, "--variants", "flip,none", "--seeds", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "1 of 2 ablation child runs failed: ablation-flip-s0" in err
    runs = all_runs(tracking_uri)
    status = {r.data.tags.get("augment", "parent"): r.info.status for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert status == {"flip": "FAILED", "none": "FINISHED"}
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED" and "ablation-flip-s0" in parent.data.tags["failure_reason"]
    (failed,) = [r for r in runs if r.data.tags.get("augment") == "flip"]
    assert "DivergenceError" in failed.data.tags["failure_reason"]
    assert "ablation.csv" in artifact_paths(tracking_uri, parent.info.run_id)  # the finished variant's table


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--variants", "none,mixup"], "variants=['none', 'mixup'] must be a non-empty list of distinct augmentation presets"),
        (["--seed", "1", "--seeds", "1,2"], "give either --seed (one seed) or --seeds (a list), not both"),
    ],
)
def test_ablation_bad_input_is_one_line(args, fragment, synthetic_root, tracking_uri, monkeypatch, capsys):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    with pytest.raises(SystemExit) as exit_info:
        main(augment_ablation.command, args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and fragment in err and len(err.strip().splitlines()) == 1
    assert all_runs(tracking_uri) == []


def test_finetune_table_from_the_newest_head_and_all_runs(synthetic_root, tracking_uri, monkeypatch, capsys, fast_config, tmp_path, local_imagenet_weights):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    with pytest.raises(SystemExit) as exit_info:
        main(cli, ["finetune-table", "--dataset", "breastmnist"])
    assert exit_info.value.code == 2 and "no FINISHED baseline run for breastmnist with finetune=head" in capsys.readouterr().err
    for mode in ("head", "all"):  # head-only: ImageNet weights (weights=auto), here a locally saved file
        main(baseline.command, ["--config", fast_config, "--model", "resnet18", "--stem", "imagenet", "--finetune", mode, "--epochs", "2"])
    main(cli, ["finetune-table", "--dataset", "breastmnist", "--model", "resnet18"])
    out = capsys.readouterr().out
    assert "head-only vs. full fine-tuning" in out and "| head |" in out and "| all |" in out
    # weights=auto: ImageNet weights for head-only, random ones for full fine-tuning, and the table says so
    assert (
        "Different starts: head-only from resnet18 with ImageNet weights and the imagenet stem, full fine-tuning from resnet18 with random weights and the imagenet stem"
    ) in out
    table_run = all_runs(tracking_uri)[0]
    assert table_run.info.status == "FINISHED"
    assert_contract(tracking_uri, table_run, classifier=False)
    assert {"finetune_table.md", "finetune_table.csv", "plots/finetune_losses.png"} <= artifact_paths(tracking_uri, table_run.info.run_id)
    table = pd.read_csv(download(tracking_uri, table_run.info.run_id, "finetune_table.csv", tmp_path))
    runs = {r.data.tags["finetune"]: r for r in all_runs(tracking_uri) if r.data.tags["stage"] == "baseline"}
    assert table.finetune.tolist() == ["head", "all"]
    for _, line in table.iterrows():
        source = runs[line.finetune]
        assert line.run_id == source.info.run_id and line.epochs == 2
        assert line.test_auroc == pytest.approx(source.data.metrics["test_auroc"], abs=1e-4)
        assert line.best_epoch == source.data.metrics["best_epoch"]
        history = mlflow.MlflowClient(tracking_uri).get_metric_history(source.info.run_id, "train_loss")
        assert line.train_loss_at_best == pytest.approx(history[int(line.best_epoch) - 1].value, abs=1e-4)
    assert table_run.data.tags["source_run_id"] == f"{runs['head'].info.run_id},{runs['all'].info.run_id}"


@pytest.mark.slow
def test_ablation_through_mlflow_run(synthetic_root, tracking_uri, tmp_path, fast_config):
    params = {"variants": "none,flip", "seeds": "0", "config": fast_config}
    result = mlflow_run("augment_ablation", params, cli_env(synthetic_root, tracking_uri), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(tracking_uri)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["variants"] == "none,flip" and parent.data.tags["stage"] == "augment_ablation"
