"""Processes sharing one SQLite store: six logging at once to a store made before, and six starting
together on a store that does not exist yet (made once, under a lock)."""

import sqlite3
import subprocess
import sys

import mlflow

from pipeline import tracking
from tests.conftest import all_runs, artifact_paths, assert_contract, cli_env

WRITER = """
import sys
from pipeline import tracking
i = int(sys.argv[1])
with tracking.tracked_run("eda", "breastmnist", {"model": "-", "seed": i}, run_name=f"writer-{i}"):
    for step in range(1, 41):
        tracking.log_metrics({"writer_metric": step * i, "writer_step": step}, step=step)
    for k in range(3):
        tracking.log_text(f"{i}-{k}", f"notes/{k}.txt")
"""
BASELINES, WRITERS = 3, 3


def test_six_processes_log_to_one_sqlite_store_at_once(synthetic_root, tracking_uri, tmp_path):
    tracking.ensure_store()
    config = tmp_path / "tiny.yaml"
    config.write_text("epochs: 2\nbatch_size: 32\nbootstrap: 20\ncheckpoint_every: 1\ncheckpoint_min_seconds: 0\n")
    env = cli_env(synthetic_root, tracking_uri)
    commands = [[sys.executable, "-m", "entrypoints.baseline", "--config", str(config), "--seed", str(i)] for i in range(BASELINES)]
    commands += [[sys.executable, "-c", WRITER, str(i)] for i in range(1, WRITERS + 1)]
    procs = [subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    try:
        errors = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(e[-2000:] for e in errors)

    runs = all_runs(tracking_uri)
    assert len(runs) == BASELINES + WRITERS
    assert {r.info.status for r in runs} == {"FINISHED"}
    client = mlflow.MlflowClient(tracking_uri)
    for run in runs:
        if run.data.tags["stage"] == "baseline":
            assert_contract(tracking_uri, run)
            assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
        else:
            history = client.get_metric_history(run.info.run_id, "writer_metric")
            assert sorted(m.step for m in history) == list(range(1, 41))
            assert artifact_paths(tracking_uri, run.info.run_id) == {f"notes/{k}.txt" for k in range(3)}
    assert sorted(r.data.tags["seed"] for r in runs if r.data.tags["stage"] == "eda") == ["1", "2", "3"]


def test_six_processes_starting_on_a_store_that_does_not_exist_create_it_once(synthetic_root, tmp_path):
    store = tmp_path / "fresh" / "mlflow.db"
    uri = f"sqlite:///{store}"
    env = cli_env(synthetic_root, uri)
    commands = [[sys.executable, "-m", "entrypoints.runs", "clean-stale", "--dry-run"] for _ in range(6)]
    procs = [subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, "\n".join(e[-2000:] for e in errors)
    with sqlite3.connect(store) as db:  # migrated once, to the head revision, no leftover migration table
        assert len(db.execute("select version_num from alembic_version").fetchall()) == 1
        assert not db.execute("select name from sqlite_master where name like '_alembic_tmp%'").fetchall()
    names = [e.name for e in mlflow.MlflowClient(uri).search_experiments()]
    assert len(names) == len(set(names)) and {"breastmnist", "pneumoniamnist"} <= set(names)
    assert mlflow.MlflowClient(uri).search_runs([e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()]) == []


def test_a_store_locked_for_30_seconds_mid_training_delays_the_run_but_does_not_kill_it(synthetic_root, tracking_uri, tmp_path):
    import time

    tracking.ensure_store()
    config = tmp_path / "long.yaml"
    config.write_text("epochs: 40\nbatch_size: 32\nbootstrap: 20\n")
    env = cli_env(synthetic_root, tracking_uri)
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.baseline", "--config", str(config)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        while not (all_runs(tracking_uri) and "train_loss" in all_runs(tracking_uri)[0].data.metrics):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        store = tracking.sqlite_path(tracking_uri)
        with sqlite3.connect(store, timeout=60, isolation_level=None) as db:  # another process holds a write transaction
            db.execute("BEGIN IMMEDIATE")
            time.sleep(30)
            assert proc.poll() is None, "the run died while the store was locked"
            db.execute("COMMIT")
        stderr = proc.communicate(timeout=600)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED"
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "train_loss")
    assert sorted(h.step for h in history) == list(range(1, 41))  # no epoch lost or logged twice
