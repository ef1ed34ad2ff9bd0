"""The tracking store itself: created once under a lock, the template's experiments, the
contract, the URI."""

from __future__ import annotations

import fcntl
import os
import urllib.parse
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.tracking.writes import _one_line, _write, refusal, refused, sqlite_path


TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "mlruns_template"


MLFLOW_VERSION = mlflow.__version__  # what `compare` reports in its reproducibility lines


@lru_cache(maxsize=1)
def contract() -> dict[str, Any]:
    """The tag/metric/artifact contract declared in mlruns_template/contract.yaml."""
    return yaml.safe_load((TEMPLATE_DIR / "contract.yaml").read_text())


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
    return {"mlflow.note.content": description, "contract.version": str(contract()["version"]), "mlflow.experimentKind": "custom_model_development"}


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


def mlflow_uri() -> str:
    """The tracking URI in use."""
    return mlflow.get_tracking_uri()


def experiment_id(name: str) -> str | None:
    """The id of the experiment called `name`, or None when the store has none."""
    experiment = MlflowClient().get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None
