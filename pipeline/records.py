"""A run as the rest of the project reads it: a plain record that `tracking` builds from MLflow's
entities, so no module outside `tracking` needs MLflow to read a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class RunRecord:
    """One run as the rest of the project reads it: its tags, its resolved config (the `cfg.<key>`
    params, un-prefixed), its other params (`mlflow run`'s `-P`, derived values), its final metrics. Hashed by its scalar fields."""

    id: str
    name: str
    experiment_id: str
    status: str
    start: int  # ms since the epoch, as MLflow keeps it
    artifact_uri: str
    tags: Mapping[str, str] = field(hash=False)
    config: Mapping[str, str] = field(hash=False)
    params: Mapping[str, str] = field(hash=False)
    metrics: Mapping[str, float] = field(hash=False)

    @property
    def stage(self) -> str:
        return self.tags.get("stage", "")

    @property
    def dataset(self) -> str:
        return self.tags.get("dataset", "")

    @property
    def parent(self) -> str:
        """The id of the run this one is nested in ("" for a top-level run)."""
        return self.tags.get("mlflow.parentRunId", "")


def final_metrics(run: RunRecord) -> dict[str, float]:
    """A run's metrics with the selected checkpoint's validation values under `val_*`: they are
    logged as `best_val_*` (runs logged before that logged them last under the per-epoch keys)."""
    values = run.metrics
    return {**values, **{k.removeprefix("best_"): v for k, v in values.items() if k.startswith("best_val_")}}
