"""Shared fixtures: synthetic MedMNIST files, a real SQLite MLflow store per test, CLI runners."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights

from pipeline.synthetic import write_synthetic

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = Path(os.environ.get("MEDMNIST_REAL_ROOT") or os.environ.get("MEDMNIST_ROOT") or "/nonexistent")  # the official files, when given

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A data root with small synthetic breastmnist and pneumoniamnist files (28 px)."""
    root = tmp_path_factory.mktemp("medmnist")
    write_synthetic(root, "breastmnist", seed=1)
    write_synthetic(root, "pneumoniamnist", seed=2, positive_rate=0.6)
    return root


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty SQLite tracking store with MLflow's schema, made once per session: migrating a new
    store costs about 2.5 s, copying this one a tenth of a second."""
    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def fresh_store(empty_store: Path, folder: Path) -> str:
    """A copy of the empty store in `folder`, its Default experiment's artifacts under `folder`
    (as if MLflow had created the store there)."""
    path = folder / "mlflow.db"
    shutil.copy(empty_store, path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (str(folder / "mlruns" / "0"),))
    return f"sqlite:///{path}"


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch, empty_store) -> str:
    """A fresh SQLite tracking store with absolute artifact paths, active for this test."""
    uri = fresh_store(empty_store, tmp_path)
    # mlflow.set_experiment (called by in-process runs) exports MLFLOW_EXPERIMENT_ID: an id from an
    # earlier test's store would send this test's runs (and subprocesses) to a wrong or missing experiment.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


OFFLINE_ENV = {"https_proxy": "http://127.0.0.1:9"}  # ImageNet weights unreachable, as on a machine with no internet


def use_store(patch: pytest.MonkeyPatch, uri: str, data_root: Path, folder: Path) -> None:
    """Point tracking, data, the torch cache (no ImageNet weights, offline) and cwd at a test store."""
    patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    for key, value in {"MLFLOW_TRACKING_URI": uri, "MEDMNIST_ROOT": str(data_root), "TORCH_HOME": str(folder / "no-weights"), **OFFLINE_ENV}.items():
        patch.setenv(key, value)
    patch.chdir(folder)
    mlflow.set_tracking_uri(uri)


@pytest.fixture(scope="session")
def smoke_study(synthetic_root, empty_store, tmp_path_factory) -> tuple[str, Path]:
    """A store the smoke study of breastmnist filled once per session (ImageNet weights
    unavailable, as offline), and its folder (tables under `reports/`, the hand-ins it exported as
    `smoke` under `results/`). Tests that add runs to it
    add, never replace; a test that must change what the study left copies the store first."""
    folder = tmp_path_factory.mktemp("smoke-study")
    uri = fresh_store(empty_store, folder)
    from entrypoints import study
    from entrypoints.common import main

    with pytest.MonkeyPatch.context() as patch:
        use_store(patch, uri, synthetic_root, folder)
        try:
            main(
                study.command,
                [
                    "--dataset",
                    "breastmnist",
                    "--profile",
                    "smoke",
                    "--out",
                    str(folder / "reports"),
                    "--export-results",
                    "smoke",
                    "--results-root",
                    str(folder / "results"),
                ],
            )
        finally:
            mlflow.set_tracking_uri(None)
    return uri, folder


@pytest.fixture()
def smoke_store(smoke_study, synthetic_root, monkeypatch) -> tuple[str, Path]:
    """The session's smoke-study store, active for this test (tracking URI, data root, cwd)."""
    uri, folder = smoke_study
    use_store(monkeypatch, uri, synthetic_root, folder)
    yield uri, folder
    mlflow.set_tracking_uri(None)


def cli_env(data_root: Path | str, tracking: str, **extra: str) -> dict[str, str]:
    """Environment for a subprocess: the venv's bin first on PATH, data root, tracking store."""
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        MEDMNIST_ROOT=str(data_root),
        MLFLOW_TRACKING_URI=tracking,
        MLFLOW_DISABLE_TELEMETRY="true",
        TQDM_DISABLE="1",
        **extra,
    )
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    return env


def run_step(step: str, args: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m entrypoints.<step> ARGS` run in `cwd` (the test's tmp dir), capturing output."""
    return subprocess.run(
        [sys.executable, "-m", f"entrypoints.{step}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mlflow_run(step: str, params: dict[str, str], env: dict[str, str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """`mlflow run REPO -e STEP -P k=v ... --env-manager local`, as a user types it."""
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", step, "--env-manager", "local"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def all_runs(tracking: str):
    """Every run in the store, newest first, as MLflow entities."""
    client = mlflow.MlflowClient(tracking)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, order_by=["attributes.start_time DESC"])


def artifact_paths(tracking: str, run_id: str) -> set[str]:
    """All artifact file paths of a run."""
    client = mlflow.MlflowClient(tracking)
    found: set[str] = set()

    def walk(path: str | None) -> None:
        for item in client.list_artifacts(run_id, path):
            if item.is_dir:
                walk(item.path)
            else:
                found.add(item.path)

    walk(None)
    return found


def assert_contract(tracking: str, run, classifier: bool = True) -> None:
    """A run carries DESIGN's required tags and, for classifiers, every metric key and artifact."""
    from pipeline.tracking import contract

    spec = contract()
    missing_tags = [t for t in spec["required_tags"] if t not in run.data.tags]
    assert not missing_tags, f"run {run.info.run_id} lacks tags {missing_tags}"
    assert run.data.tags["week"] == spec["weeks"][run.data.tags["stage"]]
    if not classifier:
        return
    expected = {f"{s}_{m}" for s in spec["final_splits"] for m in spec["final_metrics"]}
    expected |= set(spec["epoch_metrics"]) | {"best_epoch"}
    assert expected <= set(run.data.metrics), f"missing metrics {expected - set(run.data.metrics)}"
    missing = set(spec["classifier_artifacts"]) - artifact_paths(tracking, run.info.run_id)
    assert not missing, f"missing artifacts {missing}"


def save_local_imagenet_weights(torch_home: Path) -> dict:
    """A ResNet-18 state dict saved where torchvision's weights API caches its download (ImageNet
    weights cannot be fetched here): the real loading code reads it. Returns the state."""
    target = torch_home / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, target)
    return state


@pytest.fixture()
def local_imagenet_weights(tmp_path, monkeypatch):
    """TORCH_HOME pointed at a folder holding locally saved 'ImageNet' weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return save_local_imagenet_weights(tmp_path)
