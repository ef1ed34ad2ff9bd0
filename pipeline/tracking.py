"""The one module that talks to MLflow: runs, tags, params, metrics, artifacts and run lookup.

Works under `mlflow run` (the run already exists: MLFLOW_RUN_ID) and standalone (the experiment
is chosen here). Every run this module opens ends FINISHED, FAILED (an exception; the reason is
tagged `failure_reason`) or KILLED (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import mlflow
import numpy as np
import psutil
import torch
import yaml
from matplotlib.figure import Figure
from mlflow.entities import LoggedModelStatus, Run, RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.runtime import reproducibility_tags

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "mlruns_template"
MLFLOW_VERSION = mlflow.__version__  # what `compare` reports in its reproducibility lines


@lru_cache(maxsize=1)
def contract() -> dict[str, Any]:
    """The tag/metric/artifact contract declared in mlruns_template/contract.yaml."""
    return yaml.safe_load((TEMPLATE_DIR / "contract.yaml").read_text())


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for any other store)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def prepare_store() -> None:
    """Open the tracking store once before any run, under an exclusive lock beside a SQLite file.

    MLflow creates and migrates a new SQLite store on first use; several processes doing that at
    once (six jobs started together on a fresh machine) interleave their migrations and leave the
    store half-migrated for good. The lock makes them take turns: the first creates, the others
    find it made. Other stores (a server, PostgreSQL) serialise on their own.
    """
    credentials_out_of_uri()
    uri = mlflow.get_tracking_uri()
    path = sqlite_path(uri)
    try:
        if path is None or path == Path(":memory:"):
            ensure_store()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                ensure_store()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except (MlflowException, OSError) as exc:
        if refused(exc):
            raise refusal(exc, "the store") from None
        raise UserError(f"the tracking store {uri} cannot be opened: {_one_line(exc)}") from None


@lru_cache(maxsize=1)
def template_experiments() -> dict[str, dict[str, str]]:
    """The experiments mlruns_template/experiments.yaml declares, by name."""
    return yaml.safe_load((TEMPLATE_DIR / "experiments.yaml").read_text())["experiments"]


def ensure_store() -> None:
    """Create the template's experiments in the current tracking store if they are missing.

    Creating the store once here, before any parallel work, also avoids SQLite's first-use race.
    """
    client = MlflowClient()
    for name, spec in template_experiments().items():
        try:
            if client.get_experiment_by_name(name) is not None:
                continue
        except MlflowException as exc:
            if refused(exc) == 403:  # a server with access control: it exists, and is another user's
                continue
            raise
        try:
            client.create_experiment(name, tags=experiment_tags(spec["description"]))
        except MlflowException:
            if client.get_experiment_by_name(name) is None:  # not a lost race with another process
                raise


def experiment_tags(description: str) -> dict[str, str]:
    """An experiment's description, contract version, and the kind that makes MLflow's UI open it
    on the runs table of model training (not on the GenAI overview)."""
    return {"mlflow.note.content": description, "contract.version": str(contract()["version"]),
            "mlflow.experimentKind": "custom_model_development"}


def describe_experiment(experiment_id: str, dataset: str) -> None:
    """Give the experiment a run is in (made by `mlflow run --experiment-name`, say) the tags of the
    template's experiments, unless it has a description; a server that refuses leaves it as it is."""
    client = MlflowClient()
    try:
        experiment = client.get_experiment(experiment_id)
        if "mlflow.note.content" in experiment.tags:
            return
        description = template_experiments().get(dataset, {}).get("description", f"medmnist-ssl study runs ({dataset}).")
        for key, value in experiment_tags(description).items():
            _write(lambda key=key, value=value: client.set_experiment_tag(experiment_id, key, value))
    except MlflowException as exc:
        if not refused(exc):
            raise


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:4000]


def credentials_out_of_uri() -> None:
    """Move a login written into an http(s) tracking URI (http://user:pw@host) to
    MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (which MLflow reads too, and which win when
    already set): the URI MLflow prints in its run links and this project in its messages then
    holds no password."""
    parts = urllib.parse.urlsplit(mlflow.get_tracking_uri())
    if parts.scheme not in ("http", "https") or parts.password is None:
        return
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(parts.username or ""))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(parts.password))
    mlflow.set_tracking_uri(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl())


def refused(exc: BaseException) -> int | None:
    """401 or 403 when a tracking server with access control turned a request away, else None."""
    status = exc.get_http_status_code() if isinstance(exc, MlflowException) else None
    return status if status in (401, 403) else None


def refusal(exc: BaseException, what: str, hint: str = "") -> UserError:
    """One line for a refused request: a 401 points at the login settings, a 403 names what was not
    this user's (and `hint`, what to do instead)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    if refused(exc) == 401:
        login = f"the login of {user!r}" if user else "a request without a login"
        return UserError(f"the tracking server {mlflow.get_tracking_uri()} refused {login} (HTTP 401): "
                         "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return UserError(f"the tracking server {mlflow.get_tracking_uri()} refused {user or 'this client'} access to {what} "
                     f"(HTTP 403, permission denied){': ' + hint if hint else ''}")


@lru_cache(maxsize=1)
def code_version() -> str:
    """A short hash of the project's code and configs: runs with the same config hash and code
    version are interchangeable (the study reuses them)."""
    root = TEMPLATE_DIR.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("pipeline/*.py"), *root.glob("configs/**/*.yaml"), *root.glob("mlruns_template/*.yaml")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def process_tags() -> dict[str, str]:
    """The `host` and `pid` tags that let `clean-stale` tell a live run from one killed hard, and
    how the process computes (torch threads, deterministic algorithms): a same-seed rerun on
    another core count differs unless it ran deterministic."""
    return {"host": socket.gethostname(), "pid": str(os.getpid()), **reproducibility_tags()}


@contextlib.contextmanager
def tracked_run(
    stage: str,
    dataset: str,
    tags: Mapping[str, Any],
    run_name: str | None = None,
    nested: bool = False,
    resume_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or adopt, under `mlflow run`; or reopen, with `resume_run_id`) a run carrying the
    DESIGN tags and this process's `host`/`pid`; always close it.

    `tags` must include `model` and `seed` (use "-" where they do not apply); `stage`, `dataset`
    and `week` are added here.
    """
    nested = nested or mlflow.active_run() is not None  # inside `study`, every step nests
    if resume_run_id:  # checked and about to reopen: claim it first, so two resumes never both train
        claim_run(MlflowClient().get_run(resume_run_id))
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
    outcome: BaseException | None = None
    try:
        if not nested:
            describe_experiment(run.info.experiment_id, dataset)
        week = contract()["weeks"].get(stage, "")
        started_here = not (nested or resume_run_id or under_mlflow_run())  # else the command is the parent's or mlflow's
        command = {"command": _command_line or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])} if started_here else {}
        versions = _resumed_versions(resume_run_id) if resume_run_id else {"code_version": code_version()}
        set_tags({"stage": stage, "dataset": dataset, "week": week, **versions, **tags, **command, **process_tags()})
        yield run
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
                print(f"warning: run {target} could not be marked {status} ({_one_line(exc)}); "
                      "`medmnist-ssl runs clean-stale` marks it KILLED later", file=sys.stderr)

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


def _retried(call: Any, give_up: Any, attempts: int = 4) -> None:
    """Call a store write, retrying a locked or unreachable store with backoff (0.5, 1, 2 s) unless
    `give_up()` says to stop (a signal arrived: the user wants out)."""
    for attempt in range(attempts):
        try:
            call()
            return
        except Exception:  # SQLite 'database is locked', a server hiccup
            if attempt == attempts - 1 or give_up():
                raise
            time.sleep(0.5 * 2**attempt)


def _attempt(call: Callable[[], Any]) -> Any:
    """One store write with SIGINT/SIGTERM held until it returns, then raised: a signal inside
    SQLAlchemy's session would surface as a store error (the run FAILED) instead of KILLED."""
    with _signals_deferred() as caught:
        try:
            return call()
        except Exception:
            if caught:
                raise KeyboardInterrupt(f"signal {caught[0]} during a store write") from None
            raise


@contextlib.contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT/SIGTERM while a run is being closed or a store write is under way and raise the
    first afterwards; a second one raises at once (the user insists)."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def defer(signum: int, frame: Any) -> None:
        caught.append(signum)
        if len(caught) > 1:
            raise KeyboardInterrupt(f"signal {signum}, a second one while closing a run or writing to the store")

    previous = {sig: signal.signal(sig, defer) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        raise KeyboardInterrupt(f"signal {caught[0]} held while closing a run or writing to the store")


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
            tags = {"stage": stage, "week": contract()["weeks"].get(stage, ""), "dataset": params.get("dataset", ""),
                    "model": params.get("model", "").strip("'") or "-", "seed": params.get("seed", "").strip("'") or "-",
                    "failure_reason": message[:4000]}
            for key, value in tags.items():
                if key not in run.data.tags:
                    client.set_tag(run_id, key, str(value))
            client.set_terminated(run_id, "FAILED")


STORE_PATIENCE_S = 180.0  # how long a write waits out a locked or unreachable store before the run gives up
FULL = ("disk is full", "no space left on device", "disk quota exceeded")
TRANSIENT = ("database is locked", "temporarily unavailable", "connection", "timed out", "max retries", "503", "502")


def _write(call: Callable[[], Any], patience_s: float | None = None) -> Any:
    """Run one store write, retrying a locked or unreachable store with backoff (0.5 s doubling to
    8 s) for up to `patience_s`; then one UserError line. Other errors (a param logged twice with
    another value) are raised at once."""
    patience_s = STORE_PATIENCE_S if patience_s is None else patience_s
    deadline, wait = time.monotonic() + patience_s, 0.5
    while True:
        try:
            return _attempt(call)
        except Exception as exc:  # MLflow passes SQLAlchemy's OperationalError through unwrapped
            message = str(exc).lower()
            if any(word in message for word in FULL):
                run = mlflow.active_run()
                resume = f", then `--resume {run.info.run_id}` continues from its last checkpoint" if run else ""
                raise UserError(f"the tracking store {mlflow.get_tracking_uri()} (or its artifact folder) is out of disk "
                                f"space: free some{resume}") from None
            if refused(exc):
                run = mlflow.active_run()
                raise refusal(exc, f"run {run.info.run_id}" if run else "the store") from None
            if not any(word in message for word in TRANSIENT):
                raise
            if time.monotonic() + wait > deadline:
                run = mlflow.active_run()
                resume = f"; its last checkpoint is kept: `--resume {run.info.run_id}` continues it" if run else ""
                raise UserError(f"the tracking store {mlflow.get_tracking_uri()} stayed locked or unreachable for "
                                f"{patience_s:.0f} s ({_one_line(exc)}){resume}") from None
            time.sleep(wait)
            wait = min(wait * 2, 8.0)


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run (values as strings)."""
    _write(lambda: mlflow.set_tags({k: str(v) for k, v in tags.items()}))


def log_config(config: Mapping[str, Any]) -> None:
    """Log the resolved config as `cfg.<key>` params (never colliding with `mlflow run`'s `-P`
    params) and as `config.yaml`."""
    params = {f"cfg.{k}": ",".join(map(str, v)) if isinstance(v, list) else v for k, v in config.items()}
    _write(lambda: mlflow.log_params(params))
    _write(lambda: mlflow.log_text(yaml.safe_dump(dict(config), sort_keys=True), "config.yaml"))


def log_params(params: Mapping[str, Any]) -> None:
    """Log values a step derives from its config (e.g. an epoch budget converted to steps) as params."""
    _write(lambda: mlflow.log_params(dict(params)))


def logged_config(run: Run) -> dict[str, str]:
    """The resolved config a run logged (its `cfg.<key>` params, as `log_config` wrote them), by key."""
    return {k.removeprefix("cfg."): v for k, v in run.data.params.items() if k.startswith("cfg.")}


NOTE_LIMIT = 7800  # MLflow keeps tag values up to 8000 characters


def describe_run(markdown: str) -> None:
    """The active run's description (the UI's Description box, Markdown); a long one is cut at a
    line, saying so."""
    if len(markdown) > NOTE_LIMIT:
        markdown = markdown[:NOTE_LIMIT].rpartition("\n")[0] + "\n\n(cut here: the full tables are in the artifacts)\n"
    set_tags({"mlflow.note.content": markdown})


def run_link(run_id: str, text: str = "") -> str:
    """A Markdown link to a run's page in the UI (relative, so it works on any server); the run is
    looked up, since a step a study reused may sit in another experiment."""
    run = MlflowClient().get_run(run_id)
    return f"[{text or run.info.run_name or run_id[:8]}](#/experiments/{run.info.experiment_id}/runs/{run_id})"


def log_metrics(values: Mapping[str, float], step: int | None = None, model_id: str | None = None) -> None:
    """Log numeric metrics (NaN kept: MLflow stores it) at an optional step; with `model_id` they are
    also the metrics of that logged model (its page and the Models tab show them)."""
    _write(lambda: mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step, model_id=model_id))


def log_figure(fig: Figure, artifact_file: str) -> None:
    """Log a matplotlib figure as a PNG artifact and release it."""
    import matplotlib.pyplot as plt

    try:
        _write(lambda: mlflow.log_figure(fig, artifact_file, save_kwargs={"dpi": 120, "bbox_inches": "tight"}))
    finally:
        plt.close(fig)


def log_json(data: Any, artifact_file: str) -> None:
    """Log a JSON-serialisable object as an artifact file."""
    _write(lambda: mlflow.log_text(json.dumps(data, indent=2, default=float), artifact_file))


def log_table(rows: list[Mapping[str, Any]], artifact_file: str) -> None:
    """Log rows as an MLflow table (shown in the UI's artifact view; `artifact_file` ends in .json)."""
    import pandas as pd

    _write(lambda: mlflow.log_table(pd.DataFrame(rows), artifact_file))


def log_text(text: str, artifact_file: str) -> None:
    """Log a text artifact (CSV, Markdown, JSONL...)."""
    _write(lambda: mlflow.log_text(text, artifact_file))


def log_file(local_path: Path, artifact_dir: str | None = None) -> None:
    """Log a local file under `artifact_dir`."""
    _write(lambda: mlflow.log_artifact(str(local_path), artifact_dir))


@dataclass(frozen=True)
class InputData:
    """One dataset a run reads, for MLflow's lineage (the runs table's Dataset column): the arrays
    (MLflow keeps their digest, shape and dtype, not the data), the file they came from, their role."""

    name: str
    context: str
    source: str
    features: np.ndarray
    targets: np.ndarray


def log_inputs(inputs: Iterable[InputData]) -> None:
    """Log each input with `mlflow.log_input` (the same dataset logged again is kept once)."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    local = next(s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource")  # made at import
    for item in inputs:
        dataset = mlflow.data.from_numpy(item.features, source=local(item.source),
                                         targets=item.targets, name=item.name)
        _write(lambda dataset=dataset, context=item.context: mlflow.log_input(dataset, context=context))


def log_model(model: torch.nn.Module, example: np.ndarray, dataset: str, tags: Mapping[str, str]) -> str:
    """Log a classifier as an MLflow model of the active run and return its model id.

    Saved as a `torch.export` graph (MLflow's pt2 format): it loads with `mlflow.pytorch.load_model`
    without this project's code, and loading executes no pickled code. The signature and input
    example are float [0, 1] images N×C×H×W → one logit per image; normalisation is inside the model.
    """
    import mlflow.pytorch
    from mlflow.models import infer_signature

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.from_numpy(example).to(next(model.parameters()).device)).cpu().numpy()
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={MLFLOW_VERSION}"]
        with warnings.catch_warnings():  # torch.export's archive writer warns about every buffer of a CPU model
            warnings.filterwarnings("ignore", message="No complete tensor found")
            info = _write(lambda: mlflow.pytorch.log_model(
                model, name="model", signature=infer_signature(example, output), input_example=example,
                serialization_format="pt2", pip_requirements=requirements, params={"dataset": dataset}, tags=dict(tags)))
    finally:
        model.train(was_training)
    return info.model_id


SELECTION_KEYS = ("best_val_auroc", "selected_best_val_auroc")  # a run's own model; a grid's selected child's


@dataclass(frozen=True)
class Champion:
    """The registered model version that an alias points at, and why it was chosen."""

    name: str
    alias: str
    version: str
    model_id: str
    run_id: str
    val_auroc: float


def logged_models(dataset: str) -> list[Any]:
    """Every READY logged model of `dataset` (the `dataset` param `log_model` gives it), in any experiment."""
    experiments = [e.experiment_id for e in MlflowClient().search_experiments()]
    found = mlflow.search_logged_models(experiment_ids=experiments, filter_string=f"params.dataset = '{dataset}'",
                                        output_format="list")
    return [m for m in found if m.status == LoggedModelStatus.READY]


def validation_auroc(model: Any) -> float:
    """The validation AUROC linked to a logged model (NaN when none is)."""
    values = {m.key: m.value for m in model.metrics or []}
    return next((float(values[k]) for k in SELECTION_KEYS if k in values), float("nan"))


def register_champion(dataset: str, alias: str = "champion") -> Champion | None:
    """Register the logged model of `dataset` with the highest validation AUROC (never test) as
    `<dataset>-classifier` and point `alias` at that version; a model registered before is reused.
    None when no run of the dataset logged a model; a server's refusal is one UserError line."""
    name, client = f"{dataset}-classifier", MlflowClient()
    try:
        scored = [(validation_auroc(m), m.creation_timestamp, m) for m in logged_models(dataset)]
        scored = [entry for entry in scored if not math.isnan(entry[0])]
        if not scored:
            return None
        auroc, _, best = max(scored, key=lambda entry: entry[:2])
        source = f"models:/{best.model_id}"
        version = next((v for v in client.search_model_versions(f"name = '{name}'") if v.source == source), None)
        if version is None:
            version = _write(lambda: mlflow.register_model(source, name))
        _write(lambda: client.set_registered_model_alias(name, alias, version.version))
    except MlflowException as exc:
        if not refused(exc):
            raise
        raise refusal(exc, f"registered model {name!r}", "an administrator can grant it, or register under another name") from None
    return Champion(name, alias, str(version.version), best.model_id, best.source_run_id, auroc)


def has_artifacts(run_id: str, paths: tuple[str, ...]) -> bool:
    """Whether a run holds every one of the artifact files `paths`."""
    client = MlflowClient()
    listed: dict[str | None, set[str]] = {}
    for path in paths:
        folder = path.rpartition("/")[0] or None
        if folder not in listed:
            try:
                listed[folder] = {item.path for item in client.list_artifacts(run_id, folder)}
            except (MlflowException, OSError):
                return False
        if path not in listed[folder]:
            return False
    return True


def final_metrics(run: Run) -> dict[str, float]:
    """A run's metrics with the selected checkpoint's validation values under `val_*`: they are
    logged as `best_val_*` (runs logged before that logged them last under the per-epoch keys)."""
    values = run.data.metrics
    return {**values, **{k.removeprefix("best_"): v for k, v in values.items() if k.startswith("best_val_")}}


def find_run(stage: str, dataset: str, run_id: str = "latest", require: tuple[str, ...] = ()) -> Run:
    """A run by id (checked to be of this stage's kind and dataset) or the newest FINISHED one.

    `stage` may be a comma-separated list of acceptable stages, in order of preference for
    `latest`. With `require` (artifact paths), `latest` skips runs lacking them (e.g. the parent
    of nested children) and an explicit id without them is a UserError.
    """
    stages = [s.strip() for s in stage.split(",")]
    client = MlflowClient()
    if run_id and run_id != "latest":
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise UserError(f"run {run_id!r} was not found in the tracking store {mlflow.get_tracking_uri()}") from None
        tags = run.data.tags
        if tags.get("dataset") != dataset:
            raise UserError(f"run {run_id} is a {tags.get('dataset', 'unknown')} run, not {dataset}")
        if tags.get("stage") not in stages and not (tags.get("method") and "classifier" in stages):
            raise UserError(f"run {run_id} is a {tags.get('stage', 'unknown')} run; expected {' or '.join(stages)}")
        if require and not has_artifacts(run_id, require):
            raise UserError(
                f"run {run_id} has no {' and '.join(require)} (status {run.info.status}); "
                f"pass a FINISHED classifier run, or run_id=latest"
            )
        return run
    for candidate in stages:
        for run in finished_runs(dataset, f"tags.stage = '{candidate}'", max_results=0 if require else 1):
            if not require or has_artifacts(run.info.run_id, require):
                return run
    needs = f" with {' and '.join(require)}" if require else ""
    raise UserError(
        f"no FINISHED {' or '.join(stages)} run{needs} for {dataset} in {mlflow.get_tracking_uri()}; "
        f"run `mlflow run . -e {stages[0]} -P dataset={dataset} --env-manager local` first"
    )


def finished_runs(dataset: str, where: str = "", max_results: int = 0) -> list[Run]:
    """FINISHED runs of a dataset in any experiment, newest first; `where` adds filter clauses."""
    clauses = [f"tags.dataset = '{dataset}'", "attributes.status = 'FINISHED'"] + ([where] if where else [])
    return all_runs(" and ".join(clauses), max_results=max_results)


SEARCH_LIMIT = 100_000  # MLflow's fluent default: "every run" for any store this project meets


def all_runs(filter_string: str, order_by: str = "attributes.start_time DESC", view: int = ViewType.ACTIVE_ONLY,
             max_results: int = 0) -> list[Run]:
    """Every run (or the first `max_results`) of every active experiment that matches the filter.
    MLflow's fluent search pages through the store; one `MlflowClient.search_runs` call stops at
    1000 runs, which a team store passes."""
    return mlflow.search_runs(filter_string=filter_string, order_by=[order_by], search_all_experiments=True,
                              output_format="list", run_view_type=view, max_results=max_results or SEARCH_LIMIT)


def stage_parents(dataset: str, stage: str, where: str = "") -> list[Run]:
    """FINISHED runs of a stage not nested in a run of the same stage, newest first: a grid's parent
    counts (also as a step of a study or of a user's driver run); its children never do, even after
    the parent was deleted (the MLflow UI deletes a parent and keeps its children)."""
    same_stage = {r.info.run_id for r in all_runs(f"tags.dataset = '{dataset}' and tags.stage = '{stage}'", view=ViewType.ALL)}
    clauses = " and ".join([f"tags.stage = '{stage}'", *([where] if where else [])])
    return [r for r in finished_runs(dataset, clauses) if r.data.tags.get("mlflow.parentRunId") not in same_stage]


def child_runs(parent_run_id: str, dataset: str) -> list[Run]:
    """The FINISHED nested runs of a parent run."""
    return finished_runs(dataset, f"tags.mlflow.parentRunId = '{parent_run_id}'")


def tag_run(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set tags on a run that is not the active one."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def find_latest(stage: str, dataset: str, tags: Mapping[str, str]) -> Run:
    """The newest FINISHED run of a stage and dataset whose tags equal `tags`; none is a UserError."""
    runs = finished_runs(dataset, " and ".join([f"tags.stage = '{stage}'", *(f"tags.{k} = '{v}'" for k, v in tags.items())]))
    if not runs:
        wanted = " ".join(f"-P {k}={v}" for k, v in tags.items())
        raise UserError(
            f"no FINISHED {stage} run for {dataset} with {', '.join(f'{k}={v}' for k, v in tags.items())} in "
            f"{mlflow.get_tracking_uri()}; run `mlflow run . -e {stage} -P dataset={dataset} {wanted} --env-manager local` first"
        )
    return runs[0]


def experiment_id(name: str) -> str | None:
    """The id of the experiment called `name`, or None when the store has none."""
    experiment = MlflowClient().get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def mlflow_uri() -> str:
    """The tracking URI in use."""
    return mlflow.get_tracking_uri()


def experiment_name(run: Run) -> str:
    """The name of the experiment a run is in."""
    return MlflowClient().get_experiment(run.info.experiment_id).name


def get_run(run_id: str) -> Run:
    """One run by id."""
    return MlflowClient().get_run(run_id)


def runs_by_id(run_ids: Iterable[str]) -> dict[str, Run]:
    """The runs with these ids, deleted ones included, in one search; an id no longer in the store
    (purged by `mlflow gc`) is absent."""
    ids = sorted({i for i in run_ids if re.fullmatch(r"[\w-]+", i)})
    if not ids:
        return {}
    quoted = ", ".join(f"'{i}'" for i in ids)
    return {r.info.run_id: r for r in all_runs(f"attributes.run_id IN ({quoted})", view=ViewType.ALL)}


@lru_cache(maxsize=1)
def _scratch() -> tempfile.TemporaryDirectory:
    """This process's folder for downloaded artifacts; removed when the process exits (also after
    Ctrl-C or SIGTERM, which end a run through KeyboardInterrupt)."""
    return tempfile.TemporaryDirectory(prefix="medmnist-ssl-")


def download_artifact(run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
    """Fetch one artifact of a run to a local path (by default a fresh folder inside this process's
    scratch folder); a missing artifact is a UserError."""
    dst = dst or Path(tempfile.mkdtemp(dir=_scratch().name))
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    except (MlflowException, OSError):
        raise UserError(f"run {run_id} has no artifact {artifact_path!r}") from None


def last_logged_step(run_id: str, key: str) -> int:
    """The highest step at which `key` was logged in a run (0 when never)."""
    return max((m.step for m in MlflowClient().get_metric_history(run_id, key)), default=0)


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
    if at is None or words[at + 1:at + 2] != ["run"]:
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


def stale_reason(run: Run, older_than_s: float | None, now: float) -> str | None:
    """Why a RUNNING run is stale, or None while its process may still be working on it.

    A run whose `pid` on this `host` is gone is stale; a live process on this host never is. A run
    `mlflow run` created in a local store whose step never began (no `stage` tag: e.g. its
    environment could not be built) is stale once no `mlflow run` of its entry point, started
    before it, runs here. Otherwise (another host, or no pid tag) a run older than `older_than_s` is.
    """
    tags = run.data.tags
    age = now - run.info.start_time / 1000
    if tags.get("host") == socket.gethostname() and tags.get("pid"):
        if _process_alive(tags["pid"]):
            return None
        return f"process {tags['pid']} on {tags['host']} is gone"
    if ("stage" not in tags and "mlflow.project.entryPoint" in tags and sqlite_path(mlflow.get_tracking_uri())
            and not _mlflow_run_alive(tags["mlflow.project.entryPoint"], run.info.start_time / 1000)):
        return (f"`mlflow run -e {tags['mlflow.project.entryPoint']}` exited before its step began "
                "(e.g. it could not build its environment: see docs/steps.md)")
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
            tags = run.data.tags
            found.append(StaleRun(run.info.run_id, tags.get("stage", "-"), tags.get("dataset", "-"), run.info.start_time / 1000, reason))
    return found


PARTIAL_UPLOAD = ".artifact.uploading."  # MLflow's local artifact store stages each upload under this prefix


def remove_partial_uploads(run: Run) -> int:
    """Delete the staging files a hard-killed upload left in a run's local artifact folder (MLflow
    renames them into place only when an upload completes); returns how many. Remote stores keep none."""
    uri = run.info.artifact_uri
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
    run = client.get_run(stale.run_id)
    if run.info.status != "RUNNING":
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


def resumable_run(stage: str, dataset: str, run_id: str) -> Run:
    """A run of this stage and dataset that may be reopened: KILLED, FAILED or RUNNING but stale."""
    adopted = os.environ.get("MLFLOW_RUN_ID")
    if adopted and adopted != run_id:
        raise UserError(
            f"`mlflow run` created a new run {adopted}; resume {run_id} with `medmnist-ssl {stage} --resume {run_id}`"
        )
    run = find_run(stage, dataset, run_id)
    status = run.info.status
    if status == "FINISHED":
        raise UserError(f"run {run_id} is FINISHED; there is nothing to resume")
    if status == "RUNNING" and stale_reason(run, None, time.time()) is None:
        tags = run.data.tags
        raise UserError(
            f"run {run_id} is RUNNING (process {tags.get('pid', '?')} on {tags.get('host', 'an unknown host')}); "
            "stop it first, or mark it with `medmnist-ssl runs clean-stale` if its process is gone"
        )
    return run


def check_same_data(run: Run, data_md5: str, other_data: bool = False) -> None:
    """A resumed run must read the data file it started on: otherwise its history, model selection
    and test would mix two datasets."""
    started_on = run.data.tags.get("data_md5")
    if started_on and started_on != data_md5 and not other_data:
        raise UserError(f"run {run.info.run_id} started on a data file with MD5 {started_on}, this data root's has {data_md5}: "
                        "point --data-root at the original file, or pass --other-data to resume on this one anyway")


CLAIM_WAIT_S = 1.5  # longer than a claimant takes from its check to reopening the run


def claim_run(run: Run, wait_s: float = CLAIM_WAIT_S) -> Run:
    """Claim an interrupted run for this process before reopening it, so two simultaneous resumes
    never both train: each writes its own token into the `resume_claim` tag, waits, and reads it
    back. Only the last writer sees its token; a claimant that also finds the run reopened by a
    live process backs off. Works on any store (MLflow has no compare-and-set)."""
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    client = MlflowClient()
    for attempt in range(3):  # SQLite: two first writes of one tag key collide; the second then updates
        try:
            client.set_tag(run.info.run_id, "resume_claim", token)
            break
        except MlflowException:
            if attempt == 2:
                raise
            time.sleep(0.2)
    time.sleep(wait_s)
    now = client.get_run(run.info.run_id)
    reopened = now.info.status == "RUNNING" and stale_reason(now, None, time.time()) is None
    if now.data.tags.get("resume_claim") != token or reopened:
        raise UserError(f"run {run.info.run_id} is being resumed by another process "
                        f"({now.data.tags.get('resume_claim', '?').rsplit(':', 1)[0]}); not resuming it twice")
    remove_partial_uploads(now)
    return now
