"""The model registry: the champion classifier of a dataset, chosen on validation AUROC."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking.writes import _write, refusal, refused


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
    found = mlflow.search_logged_models(experiment_ids=experiments, filter_string=f"params.dataset = '{dataset}'", output_format="list")
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
