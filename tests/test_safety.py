"""Untrusted inputs from a shared store: bad checkpoints, missing artifacts, runs of another
dataset. Each is one clear error and writes nothing; every torch.load reads data only."""

import ast
import os
import pickle
from pathlib import Path

import mlflow
import pytest
import torch

from entrypoints import baseline
from entrypoints.common import main
from pipeline import config, tracking
from pipeline.checkpoint import load_classifier, save_checkpoint
from pipeline.config import config_hash
from pipeline.errors import UserError
from pipeline.models import ModelSpec, build_classifier
from pipeline.synthetic import write_synthetic
from tests.conftest import REPO, all_runs

CPU = torch.device("cpu")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, build_classifier(ModelSpec("smallcnn")), ModelSpec("smallcnn"), {})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot be read as data"):
        load_classifier(path, CPU)


def test_pickled_code_is_refused_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": Payload(), "spec": {}}))
    with pytest.raises(UserError, match="cannot be read as data"):
        load_classifier(path, CPU)


def test_wrong_architecture_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "best.pt"
    resnet = ModelSpec("resnet18", stem="imagenet")
    save_checkpoint(path, build_classifier(resnet), ModelSpec("smallcnn"), {})
    with pytest.raises(UserError, match="does not match the architecture smallcnn"):
        load_classifier(path, CPU)


def test_source_run_without_predictions_and_run_of_another_dataset(tracking_uri):
    tracking.ensure_store()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("pneumoniamnist").experiment_id
    run_id = client.create_run(experiment, tags={"stage": "baseline", "dataset": "pneumoniamnist"}).info.run_id
    client.set_terminated(run_id, "FINISHED")
    with pytest.raises(UserError, match="has no artifact 'predictions/val.csv'"):
        tracking.download_artifact(run_id, "predictions/val.csv")
    with pytest.raises(UserError, match="is a pneumoniamnist run, not breastmnist"):
        tracking.find_run("baseline", "breastmnist", run_id)
    with pytest.raises(UserError, match="was not found"):
        tracking.find_run("baseline", "breastmnist", "0" * 32)


def killed_run_with(client, cfg, checkpoint: Path) -> str:
    """A KILLED baseline run whose last.pt is `checkpoint`."""
    experiment = client.get_experiment_by_name(cfg["dataset"]).experiment_id
    tags = {"stage": "baseline", "dataset": cfg["dataset"], "config_hash": config_hash(cfg)}
    run_id = client.create_run(experiment, tags=tags).info.run_id
    client.log_artifact(run_id, str(checkpoint), "checkpoints")
    client.set_terminated(run_id, "KILLED")
    return run_id


def train_state(model):
    return {"epoch": 1, "model": model.state_dict(), "optimizer": {}, "scheduler": {}, "best_state": {}, "best_epoch": 1, "best_auroc": 0.5, "history": []}


def test_resume_from_bad_checkpoints_writes_nothing(synthetic_root, tracking_uri, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    tracking.ensure_store()
    client = mlflow.MlflowClient()
    cfg = config.resolve("baseline", "breastmnist", {"model": "resnet18", "stem": "imagenet"})
    small = build_classifier(ModelSpec("smallcnn"))
    wrong_arch = save_checkpoint(tmp_path / "a" / "last.pt", small, ModelSpec("resnet18"), cfg, train_state=train_state(small))
    corrupted = tmp_path / "b" / "last.pt"
    corrupted.parent.mkdir()
    corrupted.write_bytes(wrong_arch.read_bytes()[:500])
    other_cfg = {**cfg, "seed": 7}
    other_config = save_checkpoint(tmp_path / "c" / "last.pt", small, ModelSpec("resnet18"), other_cfg, train_state=train_state(small))
    no_state = save_checkpoint(tmp_path / "d" / "last.pt", small, ModelSpec("resnet18"), cfg)
    pneumonia = config.resolve("baseline", "pneumoniamnist", {})
    small_cfg = config.resolve("baseline", "breastmnist", {"model": "smallcnn"})
    empty_optimizer = save_checkpoint(tmp_path / "e" / "last.pt", small, ModelSpec("smallcnn"), small_cfg, train_state=train_state(small))
    cases = [
        (killed_run_with(client, cfg, wrong_arch), "breastmnist", "does not match the architecture resnet18"),
        (killed_run_with(client, cfg, corrupted), "breastmnist", "cannot be read as data"),
        (killed_run_with(client, cfg, other_config), "breastmnist", "config_hash differs"),
        (killed_run_with(client, cfg, no_state), "breastmnist", "holds no resumable training state"),
        (killed_run_with(client, pneumonia, no_state), "breastmnist", "is a pneumoniamnist run, not breastmnist"),
        (killed_run_with(client, small_cfg, empty_optimizer), "breastmnist", "holds an optimizer or scheduler state"),
    ]
    before = {r.info.run_id: (r.info.status, r.data.tags, r.data.metrics) for r in all_runs(tracking_uri)}
    capsys.readouterr()
    for run_id, dataset, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(baseline.command, ["--dataset", dataset, "--resume", run_id])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, err
        assert fragment in err.strip().splitlines()[-1], err
    after = {r.info.run_id: (r.info.status, r.data.tags, r.data.metrics) for r in all_runs(tracking_uri)}
    assert after == before


def torch_load_calls(path: Path):
    """(line, has weights_only=True) for every `torch.load(...)` call in a Python file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        func = getattr(node, "func", None)
        if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
            yield node.lineno, safe


def test_every_torch_load_uses_weights_only():
    files = [p for p in REPO.rglob("*.py") if not {".venv", "build", ".git"} & set(p.relative_to(REPO).parts)]
    calls = {f"{p.relative_to(REPO)}:{line}": safe for p in files for line, safe in torch_load_calls(p)}
    assert calls, "expected at least pipeline/checkpoint.py to load checkpoints"
    assert all(calls.values()), f"torch.load without weights_only=True at {[k for k, v in calls.items() if not v]}"


def test_steps_that_download_artifacts_leave_nothing_in_the_temp_folder(synthetic_root, tracking_uri, tmp_path):

    from tests.conftest import cli_env, run_step

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = cli_env(synthetic_root, tracking_uri, TMPDIR=str(scratch))
    steps = [
        ("ssl_pretrain", ["--steps", "2", "--knn-every", "1", "--batch-size", "32"]),
        ("linear_probe", ["--label-fractions", "1", "--seeds", "0", "--methods", "ssl_probe"]),  # downloads the encoder
        ("ssl_finetune", ["--label-fractions", "1", "--seeds", "0", "--epochs", "1", "--encoder-lr-scale", "0.1"]),
        ("compare", ["--out", str(tmp_path / "reports")]),
    ]  # downloads the probe grid's table
    for step, args in steps:
        result = run_step(step, ["--dataset", "breastmnist", *args], env, tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert list(scratch.iterdir()) == [], f"{step} left {[p.name for p in scratch.iterdir()]}"

    (tmp_path / "ckpt.yaml").write_text("epochs: 2\ncheckpoint_every: 1\ncheckpoint_min_seconds: 0\nbootstrap: 0\n")
    assert run_step("baseline", ["--config", str(tmp_path / "ckpt.yaml")], env, tmp_path).returncode == 0
    client = mlflow.MlflowClient(tracking_uri)
    (interrupted,) = [r.info.run_id for r in all_runs(tracking_uri) if r.data.tags.get("stage") == "baseline"]
    client.set_terminated(interrupted, "KILLED")  # as if stopped after its first checkpoint
    other = write_synthetic(tmp_path / "other-data", seed=7).parent  # other images than synthetic_root
    for args, code in [(["--resume", interrupted, "--data-root", str(other)], 2), (["--resume", interrupted], 0)]:
        result = run_step("baseline", args, env, tmp_path)  # a refused resume, then one that trains: both download last.pt
        assert result.returncode == code and (code == 0 or "started on a data file" in result.stderr), result.stderr[-2000:]
        assert list(scratch.iterdir()) == [], f"resume left {[p.name for p in scratch.iterdir()]}"
