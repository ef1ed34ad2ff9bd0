"""A baseline killed hard (SIGKILL): `runs clean-stale` marks it KILLED, `--resume` finishes it
exactly as an uninterrupted run; live runs and dry runs change nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from entrypoints import baseline, runs
from entrypoints.common import main
from pipeline import tracking
from pipeline.errors import UserError
from pipeline.tracking import lifecycle
from pipeline.tracking.housekeeping import PARTIAL_UPLOAD
from tests.conftest import REPO, all_runs, artifact_paths, cli_env

CONFIG = "epochs: 8\ncheckpoint_every: 2\ncheckpoint_min_seconds: 0\nbatch_size: 32\nbootstrap: 50\ndevice: cpu\n"
TAGS = {"model": "-", "seed": "-"}


def kill_after_checkpoint(tracking_uri, env, args, cwd, timeout=300):
    """Start a baseline, SIGKILL it once `checkpoints/last.pt` is in the store; return its run."""
    proc = subprocess.Popen([sys.executable, "-m", "entrypoints.baseline", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            found = all_runs(tracking_uri)
            if found and "checkpoints/last.pt" in artifact_paths(tracking_uri, found[0].info.run_id):
                assert proc.poll() is None, "the run finished before it could be killed"
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=60) == -signal.SIGKILL
                return mlflow.MlflowClient(tracking_uri).get_run(found[0].info.run_id), proc.pid
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.3)
        raise AssertionError("no last.pt in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def clean_stale(capsys, *args):
    main(runs.group, ["clean-stale", *args])
    return capsys.readouterr().out


def test_sigkilled_run_is_cleaned_then_resumed_exactly(synthetic_root, tracking_uri, tmp_path, monkeypatch, capsys):
    config = tmp_path / "kill.yaml"
    config.write_text(CONFIG)
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    tracking.ensure_store()
    args = ["--dataset", "breastmnist", "--config", str(config), "--seed", "5"]
    killed, pid = kill_after_checkpoint(tracking_uri, cli_env(synthetic_root, tracking_uri), args, tmp_path)
    run_id = killed.info.run_id
    assert killed.info.status == "RUNNING"
    assert killed.data.tags["pid"] == str(pid) and killed.data.tags["host"]
    logged_before = tracking.last_logged_step(run_id, "train_loss")
    last = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoints/last.pt", dst_path=str(tmp_path / "last"))
    checkpointed = torch.load(last, weights_only=True)["train_state"]["epoch"]
    assert 1 <= checkpointed <= logged_before

    with tracking.tracked_run("eda", "breastmnist", TAGS) as live:
        dry = clean_stale(capsys, "--dry-run", "--older-than", "0s")
        assert f"would mark KILLED  {run_id}  baseline  breastmnist" in dry and f"process {pid}" in dry
        assert live not in dry
        assert {r.info.status for r in all_runs(tracking_uri)} == {"RUNNING"}

        out = clean_stale(capsys, "--older-than", "0s")
        assert f"marked KILLED  {run_id}" in out and "1 stale run(s) marked KILLED" in out
        assert mlflow.get_run(live).info.status == "RUNNING"
    cleaned = mlflow.get_run(run_id)
    assert cleaned.info.status == "KILLED" and "stale: process" in cleaned.data.tags["failure_reason"]
    assert "no stale runs" in clean_stale(capsys, "--older-than", "0s")

    main(baseline.command, ["--dataset", "breastmnist", "--resume", run_id])
    resumed = mlflow.get_run(run_id)
    assert resumed.info.status == "FINISHED" and "failure_reason" not in resumed.data.tags
    assert int(resumed.data.tags["resumed_from_epoch"]) == checkpointed  # continued from last.pt, not from scratch
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(range(1, 9))
    log = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="val_log.jsonl", dst_path=str(tmp_path))
    assert [json.loads(line)["epoch"] for line in open(log)] == list(range(1, 9))

    main(baseline.command, args)
    straight = next(r for r in all_runs(tracking_uri) if r.info.run_id not in (run_id, live))
    assert straight.info.status == "FINISHED"
    finals = {k: v for k, v in straight.data.metrics.items() if k.startswith(("test_", "val_")) or k == "best_epoch"}
    assert finals == {k: resumed.data.metrics[k] for k in finals}
    assert [m.value for m in client.get_metric_history(run_id, "val_loss")] == [m.value for m in client.get_metric_history(straight.info.run_id, "val_loss")]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def fake_run(client, status="RUNNING", **tags):
    experiment = client.get_experiment_by_name("breastmnist").experiment_id
    run = client.create_run(experiment, tags={"stage": "baseline", "dataset": "breastmnist", **tags})
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_clean_stale_touches_only_stale_running_runs(tracking_uri, capsys):
    tracking.ensure_store()
    client = mlflow.MlflowClient()
    here = tracking.process_tags()["host"]
    gone = fake_run(client, host=here, pid=str(dead_pid()))
    alive = fake_run(client, host=here, pid=str(os.getpid()))
    elsewhere = fake_run(client, host="another-host", pid="1")
    untagged = fake_run(client)
    done = {s: fake_run(client, s, host=here, pid=str(dead_pid())) for s in ("FINISHED", "FAILED", "KILLED")}
    folders = {run_id: Path(mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "checkpoints" for run_id in (gone, alive)}
    for folder in folders.values():  # an upload cut short by a hard kill, and one still being written
        folder.mkdir(parents=True)
        (folder / f"{PARTIAL_UPLOAD}x1y2").write_bytes(b"half a checkpoint")
        (folder / "best.pt").write_bytes(b"a finished upload")

    out = clean_stale(capsys)
    assert gone in out and "1 stale run(s) marked KILLED" in out
    assert sorted(p.name for p in folders[gone].iterdir()) == ["best.pt"]
    assert len(list(folders[alive].iterdir())) == 2
    status = {r.info.run_id: r.info.status for r in all_runs(tracking_uri)}
    assert status[gone] == "KILLED"
    assert status[alive] == status[elsewhere] == status[untagged] == "RUNNING"
    assert all(status[run_id] == s for s, run_id in done.items())

    assert "2 stale run(s) would mark" in clean_stale(capsys, "--older-than", "0s", "--dry-run")
    assert status == {r.info.run_id: r.info.status for r in all_runs(tracking_uri)}
    out = clean_stale(capsys, "--older-than", "1h")
    assert "no stale runs" in out
    out = clean_stale(capsys, "--older-than", "0.0s")
    assert elsewhere in out and untagged in out and alive not in out
    assert mlflow.get_run(alive).info.status == "RUNNING"


def test_resume_refuses_runs_that_are_not_resumable(synthetic_root, tracking_uri, monkeypatch, capsys):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    tracking.ensure_store()
    client = mlflow.MlflowClient()
    here = tracking.process_tags()["host"]
    cases = {
        fake_run(client, "FINISHED"): "is FINISHED; there is nothing to resume",
        fake_run(client, host=here, pid=str(os.getpid())): "is RUNNING (process",
        fake_run(client, "KILLED"): "has no artifact 'checkpoints/last.pt'",
    }
    capsys.readouterr()
    for run_id, fragment in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(baseline.command, ["--resume", run_id])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # after MLflow's download progress bar, if any
        assert exit_info.value.code == 2 and "Traceback" not in err, err
        assert last.startswith("medmnist-ssl baseline: error:") and fragment in last, err
    with pytest.raises(SystemExit):
        main(baseline.command, ["--resume", next(iter(cases)), "--epochs", "3"])
    assert "drop --epochs" in capsys.readouterr().err


def test_a_resumed_run_keeps_the_code_version_it_started_with(tracking_uri, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run("baseline", "breastmnist", {"model": "-", "seed": "-"}) as run_id:
            raise KeyboardInterrupt
    started = tracking.code_version()
    monkeypatch.setattr(lifecycle, "code_version", lambda: "edited0000aa")
    with tracking.tracked_run("baseline", "breastmnist", {"model": "-", "seed": "-"}, resume_run_id=run_id):
        pass
    resumed = mlflow.get_run(run_id)
    assert resumed.info.status == "FINISHED" and "failure_reason" not in resumed.data.tags
    assert resumed.data.tags["code_version"] == started and resumed.data.tags["resumed_code_version"] == "edited0000aa"


def test_two_simultaneous_resumes_of_one_run_train_it_once(synthetic_root, tracking_uri, tmp_path, monkeypatch, capsys):
    config = tmp_path / "kill.yaml"
    config.write_text(CONFIG)
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    tracking.ensure_store()
    env = cli_env(synthetic_root, tracking_uri)
    killed, _ = kill_after_checkpoint(tracking_uri, env, ["--dataset", "breastmnist", "--config", str(config)], tmp_path)
    run_id = killed.info.run_id
    clean_stale(capsys)
    command = [sys.executable, "-m", "entrypoints.baseline", "--dataset", "breastmnist", "--resume", run_id]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, err in results if code)
    # the later one is refused in one line: by the claim, or (when it starts after the winner reopened the run) as RUNNING
    assert f"run {run_id} is being resumed by another process" in loser or f"run {run_id} is RUNNING" in loser, loser
    assert "Traceback" not in loser
    client = mlflow.MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 9))  # one value per epoch: trained once


def test_of_two_claims_made_at_once_exactly_one_wins(tracking_uri):
    import threading

    tracking.ensure_store()
    client = mlflow.MlflowClient(tracking_uri)
    run = client.create_run("0", tags={"dataset": "breastmnist", "stage": "baseline"})
    client.set_terminated(run.info.run_id, "KILLED")
    killed = client.get_run(run.info.run_id)
    folder = Path(killed.info.artifact_uri.removeprefix("file://"))
    folder.mkdir(parents=True)
    (folder / f"{PARTIAL_UPLOAD}abc").write_bytes(b"left by the hard kill")
    outcomes: list[str] = []

    def claim():
        try:
            tracking.claim_run(tracking.get_run(killed.info.run_id), wait_s=1.0)
            outcomes.append("won")
        except UserError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes)[1] == "won" and "is being resumed by another process" in sorted(outcomes)[0], outcomes
    assert list(folder.iterdir()) == []  # the winner removed the half-written upload before reopening the run


def test_a_resume_refuses_another_data_file_unless_told(synthetic_root, tracking_uri, tmp_path, monkeypatch, capsys):
    from pipeline.data import fingerprint
    from pipeline.synthetic import write_synthetic

    config = tmp_path / "kill.yaml"
    config.write_text(CONFIG)
    tracking.ensure_store()
    env = cli_env(synthetic_root, tracking_uri)
    killed, _ = kill_after_checkpoint(tracking_uri, env, ["--dataset", "breastmnist", "--config", str(config)], tmp_path)
    run_id = killed.info.run_id
    assert killed.data.tags["data_md5"] == fingerprint("breastmnist", 28, str(synthetic_root))
    clean_stale(capsys)
    other = tmp_path / "other-data"
    write_synthetic(other, "breastmnist", seed=7)  # same name and shapes, other images
    with pytest.raises(SystemExit) as exit_info:
        main(baseline.command, ["--dataset", "breastmnist", "--resume", run_id, "--data-root", str(other)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"run {run_id} started on a data file with MD5" in err and "--other-data" in err
    assert mlflow.get_run(run_id).info.status == "KILLED" and "resume_claim" not in mlflow.get_run(run_id).data.tags
    main(baseline.command, ["--dataset", "breastmnist", "--resume", run_id, "--data-root", str(other), "--other-data"])
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_a_run_mlflow_run_opened_but_could_not_start_is_stale_by_default(tracking_uri, tmp_path, capsys):
    """The card's command without --env-manager on a machine without pyenv: MLflow opens the run,
    fails to build python_env.yaml, and exits; `clean-stale` with no options marks that run KILLED."""
    tracking.ensure_store()
    env = cli_env(tmp_path, tracking_uri, HOME=str(tmp_path))
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if "pyenv" not in p and Path(p, "pyenv").exists() is False)
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "ssl_pretrain", "-P", "dataset=breastmnist"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    (opened,) = all_runs(tracking_uri)
    assert opened.info.status == "RUNNING" and "stage" not in opened.data.tags  # MLflow's, left behind
    out = clean_stale(capsys)
    assert opened.info.run_id in out and "exited before its step began" in out
    assert mlflow.get_run(opened.info.run_id).info.status == "KILLED"
