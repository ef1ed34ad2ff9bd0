"""The one package that talks to MLflow. Everyone else calls these functions and reads runs as
`RunRecord`s: the store (`store`), a run's life (`lifecycle`), what it logs (`log`), finding runs
(`lookup`), the model registry (`registry`), stale runs (`housekeeping`); every store write goes
through `writes`."""

from pipeline.records import RunRecord, final_metrics
from pipeline.tracking.housekeeping import NotYours, StaleRun, find_stale_runs, mark_killed, remove_partial_uploads, stale_reason
from pipeline.tracking.lifecycle import (
    check_same_data,
    claim_run,
    code_version,
    fail_adopted_run,
    process_tags,
    record_command,
    resumable_run,
    runs_opened,
    tracked_run,
    under_mlflow_run,
)
from pipeline.tracking.log import (
    InputData,
    describe_run,
    log_config,
    log_figure,
    log_file,
    log_inputs,
    log_json,
    log_metrics,
    log_model,
    log_params,
    log_table,
    log_text,
    run_link,
    set_tags,
    tag_run,
)
from pipeline.tracking.lookup import (
    all_runs,
    child_runs,
    download_artifact,
    experiment_name,
    find_latest,
    find_run,
    finished_runs,
    get_run,
    has_artifacts,
    last_logged_step,
    runs_by_id,
    stage_parents,
)
from pipeline.tracking.registry import Champion, register_champion
from pipeline.tracking.store import MLFLOW_VERSION, contract, ensure_store, experiment_id, mlflow_uri, prepare_store
from pipeline.tracking.writes import sqlite_path

__all__ = [
    "MLFLOW_VERSION", "Champion", "InputData", "NotYours", "RunRecord", "StaleRun", "all_runs", "check_same_data",
    "child_runs", "claim_run", "code_version", "contract", "describe_run", "download_artifact", "ensure_store",
    "experiment_id", "experiment_name", "fail_adopted_run", "final_metrics", "find_latest", "find_run", "find_stale_runs",
    "finished_runs", "get_run", "has_artifacts", "last_logged_step", "log_config", "log_figure", "log_file", "log_inputs",
    "log_json", "log_metrics", "log_model", "log_params", "log_table", "log_text", "mark_killed", "mlflow_uri",
    "prepare_store", "process_tags", "record_command", "register_champion", "remove_partial_uploads", "resumable_run",
    "run_link", "runs_by_id", "runs_opened", "set_tags", "sqlite_path", "stage_parents", "stale_reason", "tag_run", "tracked_run",
    "under_mlflow_run",
]
