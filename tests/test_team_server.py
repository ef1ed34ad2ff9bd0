"""Team mode: a real `mlflow server` on PostgreSQL with proxied artifacts, on loopback only.

Skipped (with the reason) where the PostgreSQL server binaries are missing; `.ci/run` installs them.
"""

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
import pytest
import torch

from tests.conftest import cli_env, run_step

pytestmark = pytest.mark.server


def postgres_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl (PATH first, then Debian's versioned folders)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]).parent if candidates else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_postgres_user(home: Path) -> list[str]:
    """initdb refuses root: run the server binaries as the `postgres` account when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` account to run PostgreSQL as")
    if not shutil.which("runuser"):
        pytest.skip("running as root and `runuser` is missing")
    os.chown(home, account.pw_uid, account.pw_gid)
    return ["runuser", "-u", "postgres", "--"]


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<free port>, as a SQLAlchemy URI of its `postgres`
    database; stopped and removed afterwards."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; `apt-get install -y postgresql`")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver (psycopg2-binary, in the `test` extra) is missing")
    home = Path(tempfile.mkdtemp(prefix="medmnist-ssl-pg-"))  # in /tmp: traversable by the postgres account
    prefix = as_postgres_user(home)
    data, port = home / "data", free_port()
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True, capture_output=True, timeout=180)
    ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "120"]
    options = f"-h 127.0.0.1 -p {port} -k {home}"
    try:
        subprocess.run([*ctl, "-l", str(home / "server.log"), "-o", options, "start"], check=True, capture_output=True, timeout=180)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"  # SQLAlchemy 2.1 defaults to psycopg 3
    finally:
        subprocess.run([*ctl, "-m", "fast", "stop"], capture_output=True, timeout=180)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture()
def postgres():
    """A throwaway PostgreSQL cluster for one test."""
    with running_postgres() as uri:
        yield uri


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Poll /health until it answers, the server dies, or the time is up."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"mlflow server exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"mlflow server not healthy in {timeout}s: {log.read_text()[-3000:]}")


@contextlib.contextmanager
def serve(extra: list[str], backend: str, folder: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """`mlflow server EXTRA` on `backend` at 127.0.0.1:<free port>, proxying artifacts to `folder`/artifacts;
    yields (url, artifact folder) once /health answers and kills the server's process group afterwards.
    The server sees no MLFLOW_TRACKING_* variable of the test process."""
    port, log = free_port(), folder / "mlflow-server.log"
    artifacts = folder / "artifacts"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        *extra,
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts.as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with log.open("w") as handle:
        proc = subprocess.Popen(
            command, cwd=folder, env={**base, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url, artifacts
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture()
def team_server(postgres, tmp_path):
    """`mlflow server` on the PostgreSQL store, proxying artifacts to a local folder."""
    with serve([], postgres, tmp_path) as server:
        yield server


def test_baseline_lands_on_a_postgres_backed_server(team_server, synthetic_root, tmp_path, monkeypatch):
    url, artifacts = team_server
    result = run_step("baseline", ["--dataset", "breastmnist", "--epochs", "2", "--batch-size", "32"], cli_env(synthetic_root, url), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    # This test process is the second client: it finds the run and fetches artifacts over HTTP.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    try:
        runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'baseline'")
        assert len(runs) == 1
        run = runs.iloc[0]
        assert run["status"] == "FINISHED" and run["tags.dataset"] == "breastmnist"
        assert 0 <= run["metrics.test_auroc"] <= 1 and run["metrics.best_epoch"] in (1, 2)
        assert run["artifact_uri"].startswith("mlflow-artifacts:")
        fetched = tmp_path / "fetched"
        test_csv = mlflow.artifacts.download_artifacts(run_id=run["run_id"], artifact_path="predictions/test.csv", dst_path=str(fetched))
        assert list(pd.read_csv(test_csv).columns) == ["index", "label", "logit", "prob"]
        best = mlflow.artifacts.download_artifacts(run_id=run["run_id"], artifact_path="checkpoints/best.pt", dst_path=str(fetched))
        assert "state_dict" in torch.load(best, map_location="cpu", weights_only=True)
        assert list(artifacts.rglob("predictions/test.csv")), "artifacts were not stored under --artifacts-destination"
    finally:
        mlflow.set_tracking_uri(None)
