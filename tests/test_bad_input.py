"""Every user mistake: one clear line on stderr, a non-zero exit, no traceback, no run left RUNNING."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from medmnist.info import INFO
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from entrypoints import baseline, ssl_pretrain
from entrypoints.common import main
from pipeline import tracking
from pipeline.tracking import lifecycle, writes
from tests.conftest import all_runs, cli_env, mlflow_run, run_step

ROWS = [
    (["--dataset", "cifar10"], "unknown dataset 'cifar10'"),
    (["--dataset", "pathmnist"], "multi-class task"),
    (["--dataset", "nodulemnist3d"], "3D binary-class task"),
    (["--size", "32"], "size=32 must be one of 28, 64, 128, 224"),
    (["--epochs", "0"], "epochs=0 must be >= 1"),
    (["--batch-size", "0"], "batch_size=0 must be >= 2"),
    (["--lr", "0"], "lr=0.0 must be > 0"),
    (["--lr", "abc"], "lr='abc' is not a valid finite float"),
    (["--model", "vgg16"], "model='vgg16' must be one of smallcnn, resnet18"),
    (["--stem", "deep"], "stem='deep' must be one of cifar, imagenet"),
    (["--finetune", "half"], "finetune='half' must be one of head, all"),
    (["--device", "tpu"], "device='tpu' must be one of auto, cpu, cuda, mps"),
    (["--no-such-option", "1"], "No such option"),
]


def assert_one_clear_line(returncode, stderr, fragment):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert len(lines) == 1 and fragment in lines[0], stderr
    assert lines[0].startswith("medmnist-ssl baseline: error:")
    assert "Traceback" not in stderr


@pytest.mark.parametrize("args, fragment", ROWS, ids=[r[1][:30] for r in ROWS])
def test_bad_parameter(args, fragment, synthetic_root, tracking_uri, monkeypatch, capsys):
    """In-process through the same `main` wrapper the console script and `python -m` use."""
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    with pytest.raises(SystemExit) as exit_info:
        main(baseline.command, args)
    assert_one_clear_line(exit_info.value.code, capsys.readouterr().err, fragment)
    assert all(r.info.status != "RUNNING" for r in all_runs(tracking_uri))


def test_bad_parameter_in_a_real_process(synthetic_root, tracking_uri, tmp_path):
    result = run_step("baseline", ["--size", "32"], cli_env(synthetic_root, tracking_uri), tmp_path)
    assert_one_clear_line(result.returncode, result.stderr, "size=32 must be one of 28, 64, 128, 224")


def test_missing_data_offline(tmp_path, tracking_uri):
    empty = tmp_path / "empty-root"
    # An unroutable proxy makes the download fail fast, as on an offline machine.
    env = cli_env(empty, tracking_uri, https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    result = run_step("baseline", ["--dataset", "breastmnist"], env, tmp_path)
    assert_one_clear_line(result.returncode, result.stderr, f"breastmnist.npz is not in {empty}")
    assert INFO["breastmnist"]["MD5"] in result.stderr and "zenodo.org" in result.stderr


def test_corrupted_data(tmp_path, tracking_uri, monkeypatch, capsys):
    root = tmp_path / "bad-root"
    root.mkdir()
    (root / "breastmnist.npz").write_bytes(b"PK\x03\x04 truncated")
    monkeypatch.setenv("MEDMNIST_ROOT", str(root))
    with pytest.raises(SystemExit) as exit_info:
        main(baseline.command, ["--dataset", "breastmnist"])
    assert_one_clear_line(exit_info.value.code, capsys.readouterr().err, "is corrupted or truncated")


@pytest.mark.slow
def test_mistake_under_mlflow_run_marks_its_run_failed(synthetic_root, tracking_uri, tmp_path):
    result = mlflow_run("baseline", {"epochs": "0"}, cli_env(synthetic_root, tracking_uri), tmp_path)
    assert result.returncode != 0
    assert "medmnist-ssl baseline: error: epochs=0 must be >= 1" in result.stderr
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FAILED" and "epochs=0" in run.data.tags["failure_reason"]
    assert {k: run.data.tags.get(k) for k in ("stage", "week", "dataset", "seed")} == {
        "stage": "baseline",
        "week": "2",
        "dataset": "breastmnist",
        "seed": "-",
    }  # DESIGN's tags, failed or not


def wait_for_running_run(tracking_uri, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = all_runs(tracking_uri)
        if runs and runs[0].data.metrics.get("train_loss") is not None:
            return runs[0]
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.5)
    raise AssertionError("no run started in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interrupted_run_ends_killed(sig, synthetic_root, tracking_uri, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.baseline", "--epochs", "500", "--batch-size", "16"],
        cwd=tmp_path,
        env=cli_env(synthetic_root, tracking_uri),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_running_run(tracking_uri, proc)
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
        assert code == 130, proc.stderr.read()[-3000:]  # what the process said, if it ended otherwise
    finally:
        if proc.poll() is None:  # never leave a 500-epoch training behind a failed test
            proc.kill()
            proc.wait()
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "KILLED"
    assert "interrupted" in run.data.tags["failure_reason"]


def test_failure_inside_a_run_marks_it_failed_with_reason(synthetic_root, tracking_uri, tmp_path):
    config = tmp_path / "diverge.yaml"
    config.write_text("lr: 1.0e+30\noptimizer: sgd\nepochs: 2\nbootstrap: 0\n")
    result = run_step("baseline", ["--config", str(config)], cli_env(synthetic_root, tracking_uri), tmp_path)
    assert result.returncode == 1 and "training loss became" in result.stderr and "Traceback" not in result.stderr
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FAILED" and "DivergenceError" in run.data.tags["failure_reason"]


@pytest.mark.parametrize("batch", ["100", "8"])
def test_moco_batch_that_bn_splits_cannot_chunk(batch, synthetic_root, tracking_uri, monkeypatch, capsys):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    with pytest.raises(SystemExit) as exit_info:
        main(ssl_pretrain.command, ["--dataset", "breastmnist", "--method", "moco", "--batch-size", batch])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1
    assert f"bn_splits=8 must divide batch_size={batch} into chunks of at least 2 images" in lines[0]
    assert all_runs(tracking_uri) == []


@pytest.mark.parametrize("trouble", ["second Ctrl-C", "locked store"])
def test_a_nested_run_and_its_parent_close_when_closing_is_disturbed(trouble, tracking_uri, monkeypatch):
    real_set_tag = MlflowClient.set_tag
    shots = [1]

    def disturbed(self, run_id, key, value, *args, **kwargs):
        if key == "failure_reason" and shots:
            shots.pop()
            if trouble == "second Ctrl-C":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise MlflowException("database is locked")
        return real_set_tag(self, run_id, key, value, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_tag", disturbed)
    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run("study", "breastmnist", {"model": "-", "seed": "-"}):
            with tracking.tracked_run("baseline", "breastmnist", {"model": "-", "seed": "-"}):
                raise KeyboardInterrupt
    assert mlflow.active_run() is None
    runs = {r.data.tags["stage"]: r for r in all_runs(tracking_uri)}
    assert {stage: r.info.status for stage, r in runs.items()} == {"study": "KILLED", "baseline": "KILLED"}
    assert all("interrupted" in r.data.tags["failure_reason"] for r in runs.values())


def test_closing_stops_retrying_once_a_signal_came_and_a_second_one_abandons_it():
    calls = []

    def locked():
        calls.append(1)
        raise MlflowException("database is locked")

    with pytest.raises(MlflowException):
        writes._retried(locked, give_up=lambda: True)
    assert len(calls) == 1  # no backoff while the user waits to get out
    with pytest.raises(KeyboardInterrupt, match="while closing"):
        with writes._signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)  # the first signal waits for the run to close
            os.kill(os.getpid(), signal.SIGINT)
            raise AssertionError("a second signal must interrupt the closing")


def test_a_command_line_is_tagged_only_on_the_runs_it_starts(tracking_uri, monkeypatch):
    from entrypoints import eda

    with contextlib.suppress(SystemExit):
        main(eda.command, ["--dataset", "pneumoniamnist", "--help"])
    monkeypatch.setattr(sys, "argv", ["medmnist-ssl", "baseline", "--epochs", "3"])
    with tracking.tracked_run("baseline", "breastmnist", {"model": "-", "seed": "-"}) as run_id:
        pass
    assert mlflow.get_run(run_id).data.tags["command"] == "medmnist-ssl baseline --epochs 3"


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs (needs root, as in CI; skipped elsewhere), unmounted afterwards."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_store_on_a_full_disk_is_one_line(tiny_disk, synthetic_root, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tiny_disk}/mlflow.db")
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    tracking.ensure_store()
    with open(tiny_disk / "filler", "wb") as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 65536)
    with pytest.raises(SystemExit) as exit_info:
        main(baseline.command, ["--epochs", "1"])
    err = capsys.readouterr().err
    assert_one_clear_line(exit_info.value.code, err, "is out of disk space: free some")


def test_a_signal_during_a_store_write_is_raised_after_the_write_completes(tracking_uri):
    # a SIGTERM landing inside SQLAlchemy's session would surface as a store error (run FAILED,
    # exit 1) instead of KeyboardInterrupt (run KILLED, exit 130): the write finishes first
    done = []

    def write_interrupted_midway():
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("the rest of the write")
        return "written"

    previous = signal.signal(signal.SIGTERM, lifecycle._raise_interrupt)  # what a run installs
    try:
        with pytest.raises(KeyboardInterrupt):
            writes._write(write_interrupted_midway)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert done == ["the rest of the write"]
    assert signal.getsignal(signal.SIGTERM) is previous
