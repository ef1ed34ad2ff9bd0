"""Runs left RUNNING by a process that died hard: found, marked KILLED, their half-written
uploads removed (`medmnist-ssl runs clean-stale`)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psutil
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.records import RunRecord
from pipeline.tracking.lookup import all_runs, to_record
from pipeline.tracking.writes import refused, sqlite_path


@dataclass(frozen=True)
class StaleRun:
    """A run left RUNNING by a process that died without closing it."""

    run_id: str
    stage: str
    dataset: str
    start_time: float
    reason: str


def _process_alive(pid: str) -> bool:
    """Whether a process with this id runs on this host (a zombie counts as gone)."""
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except (ValueError, psutil.NoSuchProcess):
        return False
    except psutil.AccessDenied:
        return True


def _entry_point(words: list[str]) -> str | None:
    """The entry point of an `mlflow run` command line (`main` when not given), or None for another command."""
    at = next((i for i, word in enumerate(words[:4]) if Path(word).name == "mlflow"), None)
    if at is None or words[at + 1 : at + 2] != ["run"]:
        return None
    for i, word in enumerate(words):
        if word in ("-e", "--entry-point") and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--entry-point="):
            return word.partition("=")[2]
    return "main"


def _mlflow_run_alive(entry_point: str, started_s: float) -> bool:
    """Whether an `mlflow run -e <entry_point>` that began before `started_s` still runs on this
    host (it may be building its environment)."""
    for process in psutil.process_iter(["cmdline", "create_time"]):
        if _entry_point(process.info.get("cmdline") or []) == entry_point and (process.info.get("create_time") or 0) <= started_s:
            return True
    return False


def stale_reason(run: RunRecord, older_than_s: float | None, now: float) -> str | None:
    """Why a RUNNING run is stale, or None while its process may still be working on it.

    A run whose `pid` on this `host` is gone is stale; a live process on this host never is. A run
    `mlflow run` created in a local store whose step never began (no `stage` tag: e.g. its
    environment could not be built) is stale once no `mlflow run` of its entry point, started
    before it, runs here. Otherwise (another host, or no pid tag) a run older than `older_than_s` is.
    """
    tags = run.tags
    age = now - run.start / 1000
    if tags.get("host") == socket.gethostname() and tags.get("pid"):
        if _process_alive(tags["pid"]):
            return None
        return f"process {tags['pid']} on {tags['host']} is gone"
    if (
        "stage" not in tags
        and "mlflow.project.entryPoint" in tags
        and sqlite_path(mlflow.get_tracking_uri())
        and not _mlflow_run_alive(tags["mlflow.project.entryPoint"], run.start / 1000)
    ):
        return f"`mlflow run -e {tags['mlflow.project.entryPoint']}` exited before its step began (e.g. it could not build its environment: see docs/steps.md)"
    if older_than_s is not None and age > older_than_s:
        where = f"on {tags['host']}" if tags.get("host") else "with no host/pid tags"
        return f"RUNNING for {age / 3600:.1f} h {where} (older than {older_than_s / 3600:.2g} h)"
    return None


def find_stale_runs(older_than_s: float | None = None) -> list[StaleRun]:
    """RUNNING runs whose process is gone (this host) or that are older than `older_than_s`."""
    now = time.time()
    found = []
    for run in all_runs("attributes.status = 'RUNNING'", "attributes.start_time ASC"):
        reason = stale_reason(run, older_than_s, now)
        if reason:
            found.append(StaleRun(run.id, run.stage or "-", run.dataset or "-", run.start / 1000, reason))
    return found


PARTIAL_UPLOAD = ".artifact.uploading."  # MLflow's local artifact store stages each upload under this prefix


def remove_partial_uploads(run: RunRecord) -> int:
    """Delete the staging files a hard-killed upload left in a run's local artifact folder (MLflow
    renames them into place only when an upload completes); returns how many. Remote stores keep none."""
    uri = run.artifact_uri
    if "://" in uri and not uri.startswith("file://"):
        return 0
    folder = Path(uri.removeprefix("file://"))
    partial = list(folder.rglob(PARTIAL_UPLOAD + "*")) if folder.is_dir() else []
    for path in partial:
        path.unlink(missing_ok=True)
    return len(partial)


class NotYours(UserError):
    """A tracking server with access control refused to change a run this user may only read."""


def mark_killed(stale: StaleRun) -> bool:
    """Mark a stale run KILLED with its reason, removing half-written uploads; False when it is no
    longer RUNNING. NotYours, with the run unchanged, when the server refuses the first write."""
    client = MlflowClient()
    run = to_record(client.get_run(stale.run_id))
    if run.status != "RUNNING":
        return False
    try:
        client.set_tag(stale.run_id, "failure_reason", f"stale: {stale.reason} (marked KILLED by clean-stale)")
    except MlflowException as exc:
        if refused(exc) != 403:
            raise
        raise NotYours("the tracking server refused to change it (HTTP 403): its owner or the server's admin can mark it") from None
    client.set_terminated(stale.run_id, RunStatus.to_string(RunStatus.KILLED))
    remove_partial_uploads(run)
    return True
