"""The one module that talks to MLflow: runs, tags, params, metrics, artifacts and run lookup.

Works under `mlflow run` (the run already exists: MLFLOW_RUN_ID) and standalone (the experiment
is chosen here). Every run this module opens ends FINISHED, FAILED (an exception; the reason is
tagged `failure_reason`) or KILLED (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import yaml
from matplotlib.figure import Figure
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "mlruns_template"


@lru_cache(maxsize=1)
def contract() -> dict[str, Any]:
    """The tag/metric/artifact contract declared in mlruns_template/contract.yaml."""
    return yaml.safe_load((TEMPLATE_DIR / "contract.yaml").read_text())


def ensure_store() -> None:
    """Create the template's experiments in the current tracking store if they are missing.

    Creating the store once here, before any parallel work, also avoids SQLite's first-use race.
    """
    client = MlflowClient()
    layout = yaml.safe_load((TEMPLATE_DIR / "experiments.yaml").read_text())
    for name, spec in layout["experiments"].items():
        if client.get_experiment_by_name(name) is not None:
            continue
        try:
            client.create_experiment(
                name,
                tags={"mlflow.note.content": spec["description"], "contract.version": str(contract()["version"])},
            )
        except MlflowException:
            if client.get_experiment_by_name(name) is None:  # not a lost race with another process
                raise


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:4000]


@contextlib.contextmanager
def tracked_run(
    stage: str, dataset: str, tags: Mapping[str, Any], run_name: str | None = None, nested: bool = False
) -> Iterator[mlflow.ActiveRun]:
    """Open (or adopt, under `mlflow run`) a run carrying the DESIGN tags; always close it.

    `tags` must include `model` and `seed` (use "-" where they do not apply); `stage`, `dataset`
    and `week` are added here.
    """
    if not nested:
        ensure_store()
        if not os.environ.get("MLFLOW_RUN_ID") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or dataset)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    run = mlflow.start_run(run_name=run_name, nested=nested)
    try:
        set_tags({"stage": stage, "dataset": dataset, "week": contract()["weeks"].get(stage, ""), **tags})
        yield run
    except KeyboardInterrupt:
        mlflow.set_tag("failure_reason", "interrupted (Ctrl-C or SIGTERM)")
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException as exc:
        mlflow.set_tag("failure_reason", _one_line(exc))
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    finally:
        if not nested:
            signal.signal(signal.SIGTERM, previous)


def fail_adopted_run(message: str) -> None:
    """Under `mlflow run`, mark the pre-created run FAILED when we stop before opening it."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    client = MlflowClient()
    with contextlib.suppress(MlflowException):
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "failure_reason", message[:4000])
            client.set_terminated(run_id, "FAILED")


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run (values as strings)."""
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_config(config: Mapping[str, Any]) -> None:
    """Log the resolved config as `cfg.<key>` params (never colliding with `mlflow run`'s `-P`
    params) and as `config.yaml`."""
    params = {f"cfg.{k}": ",".join(map(str, v)) if isinstance(v, list) else v for k, v in config.items()}
    mlflow.log_params(params)
    mlflow.log_text(yaml.safe_dump(dict(config), sort_keys=True), "config.yaml")


def log_metrics(values: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric metrics (NaN kept: MLflow stores it) at an optional step."""
    mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)


def log_figure(fig: Figure, artifact_file: str) -> None:
    """Log a matplotlib figure as a PNG artifact and release it."""
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, artifact_file, save_kwargs={"dpi": 120, "bbox_inches": "tight"})
    plt.close(fig)


def log_json(data: Any, artifact_file: str) -> None:
    """Log a JSON-serialisable object as an artifact file."""
    mlflow.log_text(json.dumps(data, indent=2, default=float), artifact_file)


def log_table(rows: list[Mapping[str, Any]], artifact_file: str) -> None:
    """Log rows as an MLflow table (shown in the UI's artifact view; `artifact_file` ends in .json)."""
    import pandas as pd

    mlflow.log_table(pd.DataFrame(rows), artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    """Log a text artifact (CSV, Markdown, JSONL...)."""
    mlflow.log_text(text, artifact_file)


def log_file(local_path: Path, artifact_dir: str | None = None) -> None:
    """Log a local file under `artifact_dir`."""
    mlflow.log_artifact(str(local_path), artifact_dir)


def active_run_id() -> str:
    """The id of the active run."""
    return mlflow.active_run().info.run_id


def find_run(stage: str, dataset: str, run_id: str = "latest") -> Run:
    """A run by id (checked to be of this stage's kind and dataset) or the newest FINISHED one.

    `stage` may be a comma-separated list of acceptable stages.
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
        return run
    for candidate in stages:
        runs = client.search_runs(
            experiment_ids=[e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.stage = '{candidate}' and tags.dataset = '{dataset}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            return runs[0]
    raise UserError(
        f"no FINISHED {' or '.join(stages)} run for {dataset} in {mlflow.get_tracking_uri()}; "
        f"run `mlflow run . -e {stages[0]} -P dataset={dataset} --env-manager local` first"
    )


def find_latest(stage: str, dataset: str, tags: Mapping[str, str]) -> Run:
    """The newest FINISHED run of a stage and dataset whose tags equal `tags`; none is a UserError."""
    client = MlflowClient()
    conditions = [f"tags.stage = '{stage}'", f"tags.dataset = '{dataset}'", "attributes.status = 'FINISHED'"]
    conditions += [f"tags.{k} = '{v}'" for k, v in tags.items()]
    runs = client.search_runs(
        experiment_ids=[e.experiment_id for e in client.search_experiments()],
        filter_string=" and ".join(conditions),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        wanted = " ".join(f"-P {k}={v}" for k, v in tags.items())
        raise UserError(
            f"no FINISHED {stage} run for {dataset} with {', '.join(f'{k}={v}' for k, v in tags.items())} in "
            f"{mlflow.get_tracking_uri()}; run `mlflow run . -e {stage} -P dataset={dataset} {wanted} --env-manager local` first"
        )
    return runs[0]


def download_artifact(run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
    """Fetch one artifact of a run to a local path; a missing artifact is a UserError."""
    dst = dst or Path(tempfile.mkdtemp(prefix="medmnist-ssl-"))
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst)))
    except (MlflowException, OSError):
        raise UserError(f"run {run_id} has no artifact {artifact_path!r}") from None
