"""Fit one classifier inside an open run and log everything DESIGN lists for a classifier run.

Shared by `baseline`, the ablation children and the fine-tuning steps: train with per-epoch
validation, select by validation AUROC, evaluate val and test once with the selected weights, then
log metrics, predictions, checkpoint, plots and tables. A grid's members of one label fraction can
train together first (`train_together`, `pipeline/grouped_train.py`); each is then logged in its own
run as if it had trained there (`log_member`, `log_trained`).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from pipeline import lineage, metrics, plots, tracking
from pipeline.augment import build_augment
from pipeline.checkpoint import CheckpointSchedule, load_classifier, save_checkpoint
from pipeline.config import config_hash
from pipeline.data import DatasetSplits, Split, stratified_subset
from pipeline.errors import DivergenceError
from pipeline.gallery import log_gallery, most_confident_mistakes
from pipeline.grouped_train import Member, refusal, train_members
from pipeline.models import Classifier, ModelSpec, build_classifier
from pipeline.runtime import prepare_model, seed_everything
from pipeline.train import TrainResult, TrainSettings, predict_logits, train_classifier


@dataclass
class ClassifierOutcome:
    """Final metrics (prefixed `val_`/`test_`) and the trained model with its selected weights."""

    metrics: dict[str, float]
    model: Classifier
    result: TrainResult


def predictions_csv(logits: np.ndarray, labels: np.ndarray, index: np.ndarray | None = None) -> str:
    """DESIGN's predictions file: index (default 0..n-1), label, logit, prob (p of class 1)."""
    probs = metrics.sigmoid(logits)
    index = np.arange(len(labels)) if index is None else index
    rows = ["index,label,logit,prob"]
    rows += [f"{int(i)},{int(y)},{z:.8g},{p:.8g}" for i, y, z, p in zip(index, labels, logits, probs)]
    return "\n".join(rows) + "\n"


def final_metrics(logits: dict[str, np.ndarray], labels: dict[str, np.ndarray], cfg: Mapping[str, Any]) -> dict[str, float]:
    """`val_*` and `test_*` metric sets from each split's logits."""
    out: dict[str, float] = {}
    for split in ("val", "test"):
        values = metrics.classification_metrics(logits[split], labels[split], n_bins=cfg["ece_bins"], n_bootstrap=cfg["bootstrap"], seed=cfg["seed"])
        out.update({f"{split}_{k}": v for k, v in values.items()})
    return out


def _epoch_logger(cfg: Mapping[str, Any], spec: ModelSpec, model: Classifier, workdir: Path, logged_through: int = 0):
    """The per-epoch callback: metrics to MLflow (except epochs up to `logged_through`, already
    there from before a resume), a line to val_log.jsonl, last.pt when `CheckpointSchedule` says."""
    log_path = workdir / "val_log.jsonl"
    schedule = CheckpointSchedule(cfg["checkpoint_every"], cfg["epochs"], cfg["checkpoint_min_seconds"])

    def on_epoch(epoch: int, row: dict[str, float], state) -> None:
        if epoch > logged_through:
            log_epoch(row)
        with log_path.open("a") as handle:
            handle.write(history_lines([row]))
        if schedule.due(epoch):
            path = save_checkpoint(workdir / "last.pt", model, spec, cfg, train_state=state())
            tracking.log_file(path, "checkpoints")

    return on_epoch


def fit_and_log(
    model: Classifier,
    spec: ModelSpec,
    data: DatasetSplits,
    train: Split,
    cfg: Mapping[str, Any],
    resume: Mapping[str, Any] | None = None,
    logged_through: int = 0,
    with_model: bool = False,
) -> ClassifierOutcome:
    """Train `model` on `train` (possibly a label subset) and log the classifier artifacts (and, with
    `with_model`, an MLflow model), each epoch's metrics and `last.pt` as training goes.

    With `resume` (a `last.pt` training state of this run) training continues after its epoch;
    the config is already logged, and epochs up to `logged_through` are not logged again.
    """
    with tempfile.TemporaryDirectory(prefix="medmnist-ssl-") as tmp:
        workdir = Path(tmp)
        if resume is None:
            tracking.log_config(cfg)
        else:
            (workdir / "val_log.jsonl").write_text(history_lines(resume["history"]))
        result = train_classifier(
            model,
            train,
            data.val,
            TrainSettings.of(cfg),
            augment=build_augment(cfg["augment"]),
            on_epoch=_epoch_logger(cfg, spec, model, workdir, logged_through),
            resume=resume,
        )
        return log_selected(model, spec, data, train, cfg, result, workdir, with_model)


def log_trained(
    model: Classifier,
    spec: ModelSpec,
    data: DatasetSplits,
    train: Split,
    cfg: Mapping[str, Any],
    result: TrainResult,
    with_model: bool = False,
) -> ClassifierOutcome:
    """Log a classifier trained elsewhere (a grid member trained in its group) as `fit_and_log` logs
    one it trains: the config, each evaluated epoch's metrics at step = epoch, `val_log.jsonl`, then
    the selected weights' artifacts. No `last.pt`: a grid member is never resumed."""
    with tempfile.TemporaryDirectory(prefix="medmnist-ssl-") as tmp:
        workdir = Path(tmp)
        tracking.log_config(cfg)
        for row in result.history:
            log_epoch(row)
        (workdir / "val_log.jsonl").write_text(history_lines(result.history))
        return log_selected(model, spec, data, train, cfg, result, workdir, with_model)


def log_epoch(row: Mapping[str, float]) -> None:
    """One evaluated epoch's values as metrics at step = epoch."""
    tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def history_lines(history: list[dict[str, float]]) -> str:
    """`val_log.jsonl`'s text: one JSON object per evaluated epoch."""
    return "".join(json.dumps(row) + "\n" for row in history)


def log_selected(
    model: Classifier,
    spec: ModelSpec,
    data: DatasetSplits,
    train: Split,
    cfg: Mapping[str, Any],
    result: TrainResult,
    workdir: Path,
    with_model: bool,
) -> ClassifierOutcome:
    """Load the selected epoch's weights into `model`, evaluate them once and log the artifact
    contract, `val_log.jsonl` (from `workdir`) and the learning curves."""
    model.load_state_dict(result.best_state)
    evaluation = evaluate(model, data, cfg, train, best_epoch=result.best_epoch)
    values = log_classifier(evaluation, model, spec, data, cfg, train, step=result.history[-1]["epoch"], with_model=with_model)
    tracking.log_file(workdir / "val_log.jsonl")
    title = f"{cfg['dataset']} {cfg['model']} (best epoch {result.best_epoch})"
    tracking.log_figure(plots.learning_curves(result.history, title), "plots/learning_curves.png")
    return ClassifierOutcome(values, model, result)


@dataclass
class MemberRun:
    """A grid member: its initialised model, labelled subset and run config, and once its group has
    trained it, its result (or the divergence that would have stopped it alone)."""

    model: Classifier
    train: Split
    cfg: dict[str, Any]
    result: TrainResult | DivergenceError | None = None


def train_together(runs: list[MemberRun], val: Split) -> str:
    """Train the members (one config but the seed, subsets of one size) as one group, storing each
    one's result; returns '' or why they cannot be grouped (their results then stay None: solo)."""
    members = [Member(run.model, run.train, run.cfg["seed"]) for run in runs]
    cfg = runs[0].cfg
    settings = TrainSettings.of(cfg)
    reason = refusal(members, settings)
    if not reason:
        for run, result in zip(runs, train_members(members, val, settings, build_augment(cfg["augment"]))):
            run.result = result
    return reason


def log_member(run: MemberRun, spec: ModelSpec, data: DatasetSplits) -> dict[str, float]:
    """Inside the member's open run: log what its group trained (raising its divergence here, so
    the run fails as a solo run would), or train and log it alone when it was not grouped."""
    if run.result is None:
        return fit_and_log(run.model, spec, data, run.train, run.cfg).metrics
    if isinstance(run.result, DivergenceError):
        raise run.result
    return log_trained(run.model, spec, data, run.train, run.cfg, run.result).metrics


@dataclass
class Evaluation:
    """A classifier's val and test logits, labels and final metrics, computed before anything is logged."""

    logits: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    metrics: dict[str, float]


def evaluate(
    model: Classifier,
    data: DatasetSplits,
    cfg: Mapping[str, Any],
    train: Split,
    best_epoch: int | None = None,
    logits: Mapping[str, np.ndarray] | None = None,
) -> Evaluation:
    """Evaluate val and test once (or take precomputed `logits`): the metrics, with `n_train` (the
    labelled training images used) and `best_epoch` for a trained model (a probe has none)."""
    labels = {s: data.split(s).labels.cpu().numpy() for s in ("val", "test")}
    if logits is None:
        logits = {s: predict_logits(model, data.split(s), cfg["eval_batch_size"], cfg["amp"]) for s in ("val", "test")}
    values = final_metrics(logits, labels, cfg)
    values.update({"best_epoch": best_epoch} if best_epoch is not None else {}, n_train=len(train))
    return Evaluation(dict(logits), labels, values)


def log_classifier(
    evaluation: Evaluation,
    model: Classifier,
    spec: ModelSpec,
    data: DatasetSplits,
    cfg: Mapping[str, Any],
    train: Split,
    step: int = 0,
    with_model: bool = False,
) -> dict[str, float]:
    """Log a classifier run's artifact contract from its evaluation: inputs, metrics, predictions,
    `best.pt`, reliability and confusion plots, the mistake gallery, and with `with_model` an MLflow
    model that the metrics are linked to; tags the run `kind=classifier`. Returns the metrics."""
    logits, labels, values = evaluation.logits, evaluation.labels, evaluation.metrics
    tracking.set_tags({"kind": "classifier"})
    tracking.log_inputs(lineage.classifier_inputs(data, train, cfg))
    model_id = tracking.log_model(model, lineage.model_example(data), cfg["dataset"], {}) if with_model else None
    tracking.log_metrics({f"best_{k}" if k.startswith("val_") else k: v for k, v in values.items()}, step=step, model_id=model_id)
    test_values = {k.removeprefix("test_"): v for k, v in values.items() if k.startswith("test_")}
    tracking.log_json({**test_values, **{k: values[k] for k in ("best_epoch", "n_train") if k in values}}, "test_metrics.json")
    for split in ("val", "test"):
        tracking.log_text(predictions_csv(logits[split], labels[split]), f"predictions/{split}.csv")
    with tempfile.TemporaryDirectory(prefix="medmnist-ssl-") as tmp:
        best_epoch = values.get("best_epoch")
        tracking.log_file(save_checkpoint(Path(tmp) / "best.pt", model, spec, cfg, best_epoch=best_epoch), "checkpoints")
    probs = metrics.sigmoid(logits["test"])
    log_reliability_views(probs, labels["test"], cfg["ece_bins"])
    names = [data.label_names[str(i)] for i in (0, 1)]
    confusion = plots.confusion_matrix_plot(labels["test"], probs >= 0.5, names, "Test confusion matrix")
    tracking.log_figure(confusion, "plots/confusion_matrix.png")
    log_test_gallery(logits["test"], labels["test"], data)
    return values


def log_selected_model(rows: list[Mapping[str, Any]], data: DatasetSplits, dataset: str) -> None:
    """Log a grid's selected model (the child with the highest validation AUROC, never test) as an
    MLflow model of the grid's parent run, its child's metrics linked as `selected_*`."""
    candidates = [r for r in rows if r.get("run_id") and not math.isnan(r.get("val_auroc", math.nan))]
    if not candidates:
        return
    best = max(candidates, key=lambda r: r["val_auroc"])
    with tempfile.TemporaryDirectory(prefix="medmnist-ssl-") as tmp:
        model, _ = load_classifier(tracking.download_artifact(best["run_id"], "checkpoints/best.pt", Path(tmp)), torch.device("cpu"))
    child = tracking.get_run(best["run_id"])
    values = {k: v for k, v in child.metrics.items() if k.startswith(("test_", "best_val_"))}
    model_id = tracking.log_model(model, lineage.model_example(data), dataset, {"selected_run_id": best["run_id"]})
    tracking.log_metrics({f"selected_{k}": v for k, v in values.items()}, model_id=model_id)
    tracking.set_tags({"selected_run_id": best["run_id"]})


def log_reliability_views(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> None:
    """The test reliability diagrams: top-label confidence (the tables' ECE), p(class 1) against the
    fraction of class 1 (the plan's view, `ece_class1`), and the class-1 view with equal-count bins."""
    views = {
        "plots/reliability.png": ("top_label", "uniform", "Reliability, top label (test)"),
        "plots/reliability_class1.png": ("class1", "uniform", "Reliability, class 1 (test)"),
        "plots/reliability_class1_eqfreq.png": ("class1", "quantile", "Reliability, class 1 (test)"),
    }
    for path, (confidence, strategy, title) in views.items():
        tracking.log_figure(plots.reliability_diagram(probs, labels, n_bins, title, confidence=confidence, strategy=strategy), path)
    tracking.log_params({"mce_min_count": metrics.MCE_MIN_COUNT})


def log_test_gallery(test_logits: np.ndarray, test_labels: np.ndarray, data: DatasetSplits, n: int = 5) -> None:
    """The n most confident test mistakes of this run (gallery/misclassified_gallery.png and .csv)."""
    predictions = pd.DataFrame({"index": np.arange(len(test_labels)), "label": test_labels, "prob": metrics.sigmoid(test_logits)})
    mistakes = most_confident_mistakes(predictions, n)
    images = data.test.images.permute(0, 2, 3, 1).cpu().numpy()
    log_gallery(mistakes, images, data.label_names, f"{data.name}: {len(mistakes)} most confident test mistakes")


def model_spec(cfg: Mapping[str, Any], in_channels: int) -> ModelSpec:
    """The architecture a config asks for."""
    return ModelSpec(model=cfg["model"], in_channels=in_channels, stem=cfg["stem"], weights=cfg["weights"], dropout=cfg["dropout"])


@dataclass
class Prepared:
    """Everything a baseline run trains on, built before any run opens."""

    data: DatasetSplits
    spec: ModelSpec
    model: Classifier
    train: Split
    tags: dict[str, Any]
    name: str


def supervised_tags(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The tags of a supervised classifier run."""
    return {
        "model": cfg["model"],
        "seed": cfg["seed"],
        "method": "supervised",
        "finetune": cfg["finetune"],
        "augment": cfg["augment"],
        "label_fraction": cfg["label_fraction"],
        "config_hash": config_hash(cfg),
    }


def build_job(cfg: Mapping[str, Any], data: DatasetSplits, device: torch.device, name: str) -> Prepared:
    """Seed, build the model on `device` and draw the stratified label subset of the config."""
    seed_everything(cfg["seed"])
    spec = model_spec(cfg, data.channels)
    model = prepare_model(build_classifier(spec, cfg["finetune"]), device, cfg)
    train = data.train.subset(stratified_subset(data.train.labels.cpu().numpy(), cfg["label_fraction"], cfg["seed"]))
    return Prepared(data, spec, model, train, supervised_tags(cfg), name)


def train_supervised(cfg: Mapping[str, Any], data: DatasetSplits, device: torch.device, stage: str, name: str, nested: bool = False) -> dict[str, float]:
    """Train one classifier on already loaded data and log it as a run of `stage`; returns its metrics
    and `run_id`."""
    job = build_job(cfg, data, device, name)
    with tracking.tracked_run(stage, cfg["dataset"], job.tags, run_name=name, nested=nested) as run_id:
        return {**fit_and_log(job.model, job.spec, job.data, job.train, cfg).metrics, "run_id": run_id}
