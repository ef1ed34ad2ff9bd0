"""Grids that train a fraction's seeds together (`group_members`) log the same child runs as grids
that train them one by one: the same names, tags, artifact paths and metric keys, the same metrics
within float32 rounding, and a diverging member's child FAILED while the others FINISH.

Both grids run in one thread with deterministic algorithms, so solo runs repeat bit for bit and any
difference is the grouping's. In float32 the grouped convolutions sum in another order (1e-7 relative
a step) and Adam turns the rounding of near-zero gradients into steps of up to ±lr (docs/speed.md;
tests/test_grouped.py proves the equality in float64 to 1e-7). Measured on this test's members: losses
within 3e-4, calibration errors within 5e-4 (MCE, one bin's gap), AUROC and accuracy identical; the
tolerances leave a few times that.
"""

import mlflow
import pytest
import torch

from entrypoints import linear_probe, ssl_finetune, ssl_pretrain
from entrypoints.common import main
from pipeline.steps import linear_probe as pipeline_linear_probe
from tests.conftest import all_runs, artifact_paths, assert_contract

PRETRAIN = ["--steps", "4", "--knn-every", "4", "--batch-size", "32"]
GRID = ["--label-fractions", "0.25,1", "--seeds", "0,1,2", "--epochs", "3", "--batch-size", "16"]
FINETUNE_GRID = ["--label-fractions", "0.25", "--seeds", "0,1,2", "--epochs", "3", "--batch-size", "16", "--encoder-lr-scale", "0.1,1"]
CURVE_TOLERANCE = 1e-3  # train_loss, val_loss and val_auroc at every evaluated epoch
RANKING_TOLERANCE = 1e-3  # final AUROC and accuracies: one swapped pair of 32 validation images would move AUROC by ≥ 0.004
FINAL_TOLERANCE = 2e-3  # final losses and calibration errors (ECE, MCE, Brier, NLL)
VOLATILE_TAGS = {"mlflow.parentRunId", "mlflow.source.name", "mlflow.user", "pid", "host", "command", "grouped", "mlflow.runName", "mlflow.note.content"}


@pytest.fixture()
def ssl_run_id(synthetic_root, tracking_uri, monkeypatch) -> str:
    """One short SimCLR pretraining run, the encoder both grids use."""
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    main(ssl_pretrain.command, ["--dataset", "breastmnist", *PRETRAIN])
    (run,) = [r for r in all_runs(tracking_uri) if r.data.tags.get("stage") == "ssl_pretrain"]
    return run.info.run_id


def settings(tmp_path, group: bool, **extra) -> str:
    """A config file: one thread, deterministic algorithms, grouping on or off."""
    path = tmp_path / f"group-{group}.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in {"deterministic": "true", "group_members": str(group).lower(), **extra}.items()))
    return str(path)


def grid_children(tracking_uri: str, stage: str) -> dict[tuple[str, str], object]:
    """The children of the newest parent of `stage`, by (label fraction, seed)."""
    runs = [r for r in all_runs(tracking_uri) if r.data.tags.get("stage") == stage]
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    mine = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return {(r.data.tags["label_fraction"], r.data.tags["seed"]): r for r in mine}


def assert_same_children(tracking_uri: str, grouped: dict, solo: dict) -> None:
    """Grouped and solo children: the same runs, tags, artifacts, metric keys, curves and metrics."""
    client = mlflow.MlflowClient(tracking_uri)
    assert set(grouped) == set(solo) and len(grouped) >= 3
    for key, run in grouped.items():
        twin = solo[key]
        assert run.info.status == twin.info.status == "FINISHED"
        assert (run.data.tags["grouped"], twin.data.tags["grouped"]) == ("true", "false")
        assert run.info.run_name == twin.info.run_name
        assert {k: v for k, v in run.data.tags.items() if k not in VOLATILE_TAGS} == {k: v for k, v in twin.data.tags.items() if k not in VOLATILE_TAGS}
        assert artifact_paths(tracking_uri, run.info.run_id) == artifact_paths(tracking_uri, twin.info.run_id)
        assert set(run.data.metrics) == set(twin.data.metrics)
        assert_contract(tracking_uri, run)
        for name in ("train_loss", "val_loss", "val_auroc"):  # every evaluated epoch at step = epoch
            ours, theirs = (client.get_metric_history(r.info.run_id, name) for r in (run, twin))
            assert [m.step for m in ours] == [m.step for m in theirs]
            assert [m.value for m in ours] == pytest.approx([m.value for m in theirs], abs=CURVE_TOLERANCE), (key, name)
        for name, value in twin.data.metrics.items():
            tolerance = RANKING_TOLERANCE if "auroc" in name or "acc" in name else FINAL_TOLERANCE
            assert run.data.metrics[name] == pytest.approx(value, abs=tolerance, nan_ok=True), (key, name)


def test_grouped_supervised_children_equal_solo_ones(ssl_run_id, tracking_uri, tmp_path):
    for group in (False, True):
        main(linear_probe.command, ["--dataset", "breastmnist", "--methods", "supervised", *GRID, "--config", settings(tmp_path, group)])
        if not group:
            solo = grid_children(tracking_uri, "linear_probe")
    assert_same_children(tracking_uri, grid_children(tracking_uri, "linear_probe"), solo)


def test_grouped_finetune_children_equal_solo_ones(ssl_run_id, tracking_uri, tmp_path):
    for group in (False, True):
        main(ssl_finetune.command, ["--dataset", "breastmnist", *FINETUNE_GRID, "--config", settings(tmp_path, group)])
        if not group:
            solo = grid_children(tracking_uri, "ssl_finetune")
    assert_same_children(tracking_uri, grid_children(tracking_uri, "ssl_finetune"), solo)


def test_dropout_trains_the_finetune_seeds_one_by_one(ssl_run_id, tracking_uri, tmp_path, capsys):
    main(
        ssl_finetune.command,
        [
            "--dataset",
            "breastmnist",
            "--label-fractions",
            "1",
            "--seeds",
            "0,1",
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--encoder-lr-scale",
            "0.1",
            "--config",
            settings(tmp_path, True, dropout=0.2),
        ],
    )
    assert "ssl_finetune: the seeds at 1 train one by one (grouped training needs trainable encoders without dropout)" in capsys.readouterr().out
    children = grid_children(tracking_uri, "ssl_finetune").values()
    assert [(c.info.status, c.data.tags["grouped"]) for c in children] == [("FINISHED", "false")] * 2


@pytest.mark.parametrize("group", [True, False])
def test_a_diverging_member_fails_alone(ssl_run_id, tracking_uri, tmp_path, monkeypatch, group):
    real = pipeline_linear_probe.supervised_member

    def diverge_on_seed_1(data, spec, subset, cfg, seed, fraction, device):
        member = real(data, spec, subset, cfg, seed, fraction, device)
        if seed == 1 and fraction == 1.0:
            with torch.no_grad():
                member.model.head.bias.fill_(float("nan"))
        return member

    monkeypatch.setattr(pipeline_linear_probe, "supervised_member", diverge_on_seed_1)
    with pytest.raises(SystemExit):
        main(linear_probe.command, ["--dataset", "breastmnist", "--methods", "supervised", *GRID, "--config", settings(tmp_path, group)])
    children = grid_children(tracking_uri, "linear_probe")
    failed = children.pop(("1.0", "1"))
    assert failed.info.status == "FAILED" and "DivergenceError: training loss became nan" in failed.data.tags["failure_reason"]
    assert failed.data.tags["grouped"] == str(group).lower()
    assert [c.info.status for c in children.values()] == ["FINISHED"] * 5
    assert {c.data.tags["grouped"] for c in children.values()} == {str(group).lower()}
