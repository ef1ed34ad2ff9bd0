"""A run's life: opened (or adopted under `mlflow run`, or reopened to resume), tagged, and always
closed FINISHED, FAILED (the reason tagged `failure_reason`) or KILLED (Ctrl-C or SIGTERM)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import signal
import socket
import sys
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.runtime import reproducibility_tags
from pipeline.tracking.housekeeping import remove_partial_uploads, stale_reason
from pipeline.tracking.log import set_tags
from pipeline.records import RunRecord
from pipeline.tracking.lookup import find_run, to_record
from pipeline.tracking.store import TEMPLATE_DIR, contract, describe_experiment, ensure_store
from pipeline.tracking.writes import _one_line, _retried, _signals_deferred, _write, refusal, refused


@lru_cache(maxsize=1)
def code_version() -> str:
    """A short hash of the project's code and configs: runs with the same config hash and code
    version are interchangeable (the study reuses them)."""
    root = TEMPLATE_DIR.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("pipeline/**/*.py"), *root.glob("configs/**/*.yaml"), *root.glob("mlruns_template/*.yaml")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def process_tags() -> dict[str, str]:
    """The `host` and `pid` tags that let `clean-stale` tell a live run from one killed hard, and
    how the process computes (torch threads, deterministic algorithms): a same-seed rerun on
    another core count differs unless it ran deterministic."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), **reproducibility_tags()}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def tracked_run(
    stage: str,
    dataset: str,
    tags: Mapping[str, Any],
    run_name: str | None = None,
    nested: bool = False,
    resume_run_id: str | None = None,
) -> Iterator[str]:
    """Open (or adopt, under `mlflow run`; or reopen, with `resume_run_id`) a run carrying the
    DESIGN tags and this process's `host`/`pid`, yield its id, and always close it.

    `tags` must include `model` and `seed` (use "-" where they do not apply); `stage`, `dataset`
    and `week` are added here.
    """
    outer = mlflow.active_run()
    nested = nested or outer is not None  # inside `study`, every step nests
    if resume_run_id:  # checked and about to reopen: claim it first, so two resumes never both train
        claim_run(to_record(MlflowClient().get_run(resume_run_id)))
    if not nested:
        ensure_store()
        # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID, so that variable cannot mean "the
        # user chose": standalone runs go to MLFLOW_EXPERIMENT_NAME or the dataset's experiment.
        if not resume_run_id and not under_mlflow_run():
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or dataset
            try:
                mlflow.set_experiment(experiment)
            except MlflowException as exc:
                if not refused(exc):
                    raise
                raise refusal(exc, f"experiment {experiment!r}", "set MLFLOW_EXPERIMENT_NAME to an experiment of yours") from None
        # SIGTERM, and SIGINT even where the shell started us with it ignored (a background job),
        # raise KeyboardInterrupt so the run ends KILLED.
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    run = _write(lambda: mlflow.start_run(run_id=resume_run_id, run_name=None if resume_run_id else run_name, nested=nested))
    _open_runs.append(run.info.run_id)
    for watcher in _watchers:
        watcher.append((run.info.run_id, outer.info.run_id if outer else ""))
    outcome: BaseException | None = None
    try:
        if not nested:
            describe_experiment(run.info.experiment_id, dataset)
        week = contract()["weeks"].get(stage, "")
        started_here = not (nested or resume_run_id or under_mlflow_run())  # else the command is the parent's or mlflow's
        command = {"command": _command_line or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])} if started_here else {}
        versions = _resumed_versions(resume_run_id) if resume_run_id else {"code_version": code_version()}
        set_tags({"stage": stage, "dataset": dataset, "week": week, **versions, **tags, **command, **process_tags()})
        yield run.info.run_id
    except BaseException as exc:
        outcome = exc
        raise
    finally:
        try:
            status = _close(run.info.run_id, outcome)
            if not nested:  # the id a user needs for run_id=, --resume and the UI
                source = f", source run {tags['source_run_id']}" if tags.get("source_run_id") else ""
                print(f"{stage} run {run.info.run_id} ({dataset}{source}): {status}")
        finally:
            if not nested:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)


_open_runs: list[str] = []  # the runs tracked_run opened and has not closed, innermost last
_watchers: list[list[tuple[str, str]]] = []  # one list per `runs_opened` block


@contextlib.contextmanager
def runs_opened() -> Iterator[list[tuple[str, str]]]:
    """Collect (run id, parent run id or "") of every run this process opens inside the block: how
    `study` learns which run a step made without searching the store for it."""
    opened: list[tuple[str, str]] = []
    _watchers.append(opened)
    try:
        yield opened
    finally:
        _watchers.remove(opened)


def _resumed_versions(run_id: str) -> dict[str, str]:
    """A resumed run keeps the code version it started with (the study reuses runs by it) and
    records the one that finished it when they differ; an old failure reason is dropped."""
    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    if "failure_reason" in tags:
        client.delete_tag(run_id, "failure_reason")
    started = tags.get("code_version", code_version())
    return {"code_version": started, **({"resumed_code_version": code_version()} if started != code_version() else {})}


def _close(run_id: str, outcome: BaseException | None) -> str:
    """End a run FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED (returned), with its failure reason, also when
    a signal arrives meanwhile (deferred until the run is closed; a second one abandons closing) or
    the store is briefly locked (retried, until a signal arrives). Runs opened inside it that failed
    to close are closed with it."""
    status = "FINISHED" if outcome is None else "KILLED" if isinstance(outcome, KeyboardInterrupt) else "FAILED"
    client = MlflowClient()
    with _signals_deferred() as caught:

        def write(target: str, call: Any) -> None:
            try:
                _retried(call, give_up=lambda: bool(caught))
            except Exception as exc:
                if outcome is None:  # a FINISHED run that cannot be marked so is this process's failure
                    raise
                print(f"warning: run {target} could not be marked {status} ({_one_line(exc)}); `medmnist-ssl runs clean-stale` marks it KILLED later", file=sys.stderr)

        if outcome is not None:
            reason = "interrupted (Ctrl-C or SIGTERM)" if status == "KILLED" else _one_line(outcome)
            write(run_id, lambda: client.set_tag(run_id, "failure_reason", reason))
        while run_id in _open_runs:
            inner = _open_runs.pop()
            try:
                mlflow.end_run(status)  # pops MLflow's active-run stack before it writes to the store
            except Exception:
                write(inner, lambda: client.set_terminated(inner, status))
    return status


_command_line = ""


def record_command(words: list[str]) -> None:
    """The command line a CLI call was given, tagged `command` on the runs it starts (the draft's
    reproducibility checklist lists it)."""
    global _command_line
    _command_line = shlex.join(words)


def under_mlflow_run() -> bool:
    """True when `mlflow run` created the run this process must log into."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def fail_adopted_run(message: str, stage: str) -> None:
    """Under `mlflow run`, mark the pre-created run FAILED when we stop before opening it, with the
    DESIGN tags it would have had (dataset and seed as given by its `-P` params)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    client = MlflowClient()
    with contextlib.suppress(MlflowException):
        run = client.get_run(run_id)
        if run.info.status == "RUNNING":
            params = run.data.params
            tags = {
                "stage": stage,
                "week": contract()["weeks"].get(stage, ""),
                "dataset": params.get("dataset", ""),
                "model": params.get("model", "").strip("'") or "-",
                "seed": params.get("seed", "").strip("'") or "-",
                "failure_reason": message[:4000],
            }
            for key, value in tags.items():
                if key not in run.data.tags:
                    client.set_tag(run_id, key, str(value))
            client.set_terminated(run_id, "FAILED")


def resumable_run(stage: str, dataset: str, run_id: str) -> RunRecord:
    """A run of this stage and dataset that may be reopened: KILLED, FAILED or RUNNING but stale."""
    adopted = os.environ.get("MLFLOW_RUN_ID")
    if adopted and adopted != run_id:
        raise UserError(f"`mlflow run` created a new run {adopted}; resume {run_id} with `medmnist-ssl {stage} --resume {run_id}`")
    run = find_run(stage, dataset, run_id)
    status = run.status
    if status == "FINISHED":
        raise UserError(f"run {run_id} is FINISHED; there is nothing to resume")
    if status == "RUNNING" and stale_reason(run, None, time.time()) is None:
        tags = run.tags
        raise UserError(
            f"run {run_id} is RUNNING (process {tags.get('pid', '?')} on {tags.get('host', 'an unknown host')}); "
            "stop it first, or mark it with `medmnist-ssl runs clean-stale` if its process is gone"
        )
    return run


def check_same_data(run: RunRecord, data_md5: str, other_data: bool = False) -> None:
    """A resumed run must read the data file it started on: otherwise its history, model selection
    and test would mix two datasets."""
    started_on = run.tags.get("data_md5")
    if started_on and started_on != data_md5 and not other_data:
        raise UserError(
            f"run {run.id} started on a data file with MD5 {started_on}, this data root's has {data_md5}: "
            "point --data-root at the original file, or pass --other-data to resume on this one anyway"
        )


CLAIM_WAIT_S = 1.5  # longer than a claimant takes from its check to reopening the run


def claim_run(run: RunRecord, wait_s: float = CLAIM_WAIT_S) -> RunRecord:
    """Claim an interrupted run for this process before reopening it, so two simultaneous resumes
    never both train: each writes its own token into the `resume_claim` tag, waits, and reads it
    back. Only the last writer sees its token; a claimant that also finds the run reopened by a
    live process backs off. Works on any store (MLflow has no compare-and-set)."""
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    client = MlflowClient()
    for attempt in range(3):  # SQLite: two first writes of one tag key collide; the second then updates
        try:
            client.set_tag(run.id, "resume_claim", token)
            break
        except MlflowException:
            if attempt == 2:
                raise
            time.sleep(0.2)
    time.sleep(wait_s)
    now = to_record(client.get_run(run.id))
    reopened = now.status == "RUNNING" and stale_reason(now, None, time.time()) is None
    if now.tags.get("resume_claim") != token or reopened:
        raise UserError(f"run {run.id} is being resumed by another process ({now.tags.get('resume_claim', '?').rsplit(':', 1)[0]}); not resuming it twice")
    remove_partial_uploads(now)
    return now
