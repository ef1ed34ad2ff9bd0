"""Finding runs: by id, the newest of a stage, a grid's children, and their artifacts. Every run
leaves here as a `RunRecord`, so no module outside `tracking` reads MLflow's entities."""

from __future__ import annotations

import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

import mlflow
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.errors import UserError
from pipeline.records import RunRecord


def to_record(run: Run) -> RunRecord:
    """The plain record of an MLflow run."""
    params = run.data.params
    return RunRecord(
        id=run.info.run_id,
        name=run.info.run_name or "",
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        start=run.info.start_time or 0,
        artifact_uri=run.info.artifact_uri or "",
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
        config={k.removeprefix("cfg."): v for k, v in params.items() if k.startswith("cfg.")},
        params={k: v for k, v in params.items() if not k.startswith("cfg.")},
    )


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


def find_run(stage: str, dataset: str, run_id: str = "latest", require: tuple[str, ...] = ()) -> RunRecord:
    """A run by id (checked to be of this stage's kind and dataset) or the newest FINISHED one.

    `stage` may be a comma-separated list of acceptable stages, in order of preference for
    `latest`. With `require` (artifact paths), `latest` skips runs lacking them (e.g. the parent
    of nested children) and an explicit id without them is a UserError.
    """
    stages = [s.strip() for s in stage.split(",")]
    client = MlflowClient()
    if run_id and run_id != "latest":
        try:
            run = to_record(client.get_run(run_id))
        except MlflowException:
            raise UserError(f"run {run_id!r} was not found in the tracking store {mlflow.get_tracking_uri()}") from None
        tags = run.tags
        if tags.get("dataset") != dataset:
            raise UserError(f"run {run_id} is a {tags.get('dataset', 'unknown')} run, not {dataset}")
        if tags.get("stage") not in stages and not (tags.get("method") and "classifier" in stages):
            raise UserError(f"run {run_id} is a {tags.get('stage', 'unknown')} run; expected {' or '.join(stages)}")
        if require and not has_artifacts(run_id, require):
            raise UserError(f"run {run_id} has no {' and '.join(require)} (status {run.status}); pass a FINISHED classifier run, or run_id=latest")
        return run
    for candidate in stages:
        for run in finished_runs(dataset, f"tags.stage = '{candidate}'", max_results=0 if require else 1):
            if not require or has_artifacts(run.id, require):
                return run
    needs = f" with {' and '.join(require)}" if require else ""
    raise UserError(
        f"no FINISHED {' or '.join(stages)} run{needs} for {dataset} in {mlflow.get_tracking_uri()}; "
        f"run `mlflow run . -e {stages[0]} -P dataset={dataset} --env-manager local` first"
    )


def finished_runs(dataset: str, where: str = "", max_results: int = 0) -> list[RunRecord]:
    """FINISHED runs of a dataset in any experiment, newest first; `where` adds filter clauses."""
    clauses = [f"tags.dataset = '{dataset}'", "attributes.status = 'FINISHED'"] + ([where] if where else [])
    return all_runs(" and ".join(clauses), max_results=max_results)


SEARCH_LIMIT = 100_000  # MLflow's fluent default: "every run" for any store this project meets


def all_runs(filter_string: str, order_by: str = "attributes.start_time DESC", view: int = ViewType.ACTIVE_ONLY, max_results: int = 0) -> list[RunRecord]:
    """Every run (or the first `max_results`) of every active experiment that matches the filter.
    MLflow's fluent search pages through the store; one `MlflowClient.search_runs` call stops at
    1000 runs, which a team store passes."""
    found = mlflow.search_runs(
        filter_string=filter_string, order_by=[order_by], search_all_experiments=True, output_format="list", run_view_type=view, max_results=max_results or SEARCH_LIMIT
    )
    return [to_record(run) for run in found]


def stage_parents(dataset: str, stage: str, where: str = "") -> list[RunRecord]:
    """FINISHED runs of a stage not nested in a run of the same stage, newest first: a grid's parent
    counts (also as a step of a study or of a user's driver run); its children never do, even after
    the parent was deleted (the MLflow UI deletes a parent and keeps its children)."""
    same_stage = {r.id for r in all_runs(f"tags.dataset = '{dataset}' and tags.stage = '{stage}'", view=ViewType.ALL)}
    clauses = " and ".join([f"tags.stage = '{stage}'", *([where] if where else [])])
    return [r for r in finished_runs(dataset, clauses) if r.parent not in same_stage]


def child_runs(parent_run_id: str, dataset: str) -> list[RunRecord]:
    """The FINISHED nested runs of a parent run."""
    return finished_runs(dataset, f"tags.mlflow.parentRunId = '{parent_run_id}'")


def find_latest(stage: str, dataset: str, tags: Mapping[str, str]) -> RunRecord:
    """The newest FINISHED run of a stage and dataset whose tags equal `tags`; none is a UserError."""
    runs = finished_runs(dataset, " and ".join([f"tags.stage = '{stage}'", *(f"tags.{k} = '{v}'" for k, v in tags.items())]))
    if not runs:
        wanted = " ".join(f"-P {k}={v}" for k, v in tags.items())
        raise UserError(
            f"no FINISHED {stage} run for {dataset} with {', '.join(f'{k}={v}' for k, v in tags.items())} in "
            f"{mlflow.get_tracking_uri()}; run `mlflow run . -e {stage} -P dataset={dataset} {wanted} --env-manager local` first"
        )
    return runs[0]


def experiment_name(run: RunRecord) -> str:
    """The name of the experiment a run is in."""
    return MlflowClient().get_experiment(run.experiment_id).name


def get_run(run_id: str) -> RunRecord:
    """One run by id."""
    return to_record(MlflowClient().get_run(run_id))


def runs_by_id(run_ids: Iterable[str]) -> dict[str, RunRecord]:
    """The runs with these ids, deleted ones included, in one search; an id no longer in the store
    (purged by `mlflow gc`) is absent."""
    ids = sorted({i for i in run_ids if re.fullmatch(r"[\w-]+", i)})
    if not ids:
        return {}
    quoted = ", ".join(f"'{i}'" for i in ids)
    return {r.id: r for r in all_runs(f"attributes.run_id IN ({quoted})", view=ViewType.ALL)}


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
