"""What a run logs: tags, the config, params, metrics, figures, tables, files, inputs and models."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import mlflow
import numpy as np
import torch
import yaml
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from pipeline.tracking.writes import _write


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
        dataset = mlflow.data.from_numpy(item.features, source=local(item.source), targets=item.targets, name=item.name)
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
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
        with warnings.catch_warnings():  # torch.export's archive writer warns about every buffer of a CPU model
            warnings.filterwarnings("ignore", message="No complete tensor found")
            info = _write(
                lambda: mlflow.pytorch.log_model(
                    model,
                    name="model",
                    signature=infer_signature(example, output),
                    input_example=example,
                    serialization_format="pt2",
                    pip_requirements=requirements,
                    params={"dataset": dataset},
                    tags=dict(tags),
                )
            )
    finally:
        model.train(was_training)
    return info.model_id


def tag_run(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set tags on a run that is not the active one."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))
