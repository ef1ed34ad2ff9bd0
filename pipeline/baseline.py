"""Week 2–3 supervised baselines: one classifier trained from a resolved `baseline` config, or an
interrupted baseline run resumed from its `checkpoints/last.pt`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from pipeline import tracking
from pipeline.checkpoint import load_train_state, load_weights
from pipeline.config import config_hash
from pipeline.data import DatasetSplits, Split, fingerprint, load_splits, stratified_subset
from pipeline.errors import UserError
from pipeline.models import Classifier, ModelSpec, build_classifier
from pipeline.runtime import configure_speed, prepare_model, resolve_device, seed_everything
from pipeline.supervised import fit_and_log, model_spec
from pipeline.train import check_resume_state


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


def prepare(cfg: Mapping[str, Any], data_root: str, device: str = "") -> Prepared:
    """Load data and build the model on `device` (default: the config's); mistakes surface here,
    before any run opens."""
    target = resolve_device(device or cfg["device"])
    configure_speed(target, cfg.get("deterministic", False))
    data = load_splits(cfg["dataset"], cfg["size"], data_root, target)
    return build_job(cfg, data, target, f"baseline-{cfg['model']}-{cfg['finetune']}-s{cfg['seed']}")


def train_supervised(
    cfg: Mapping[str, Any], data: DatasetSplits, device: torch.device, stage: str, name: str, nested: bool = False
) -> dict[str, float]:
    """Train one classifier on already loaded data and log it as a run of `stage`; returns metrics."""
    job = build_job(cfg, data, device, name)
    with tracking.tracked_run(stage, cfg["dataset"], job.tags, run_name=name, nested=nested):
        return fit_and_log(job.model, job.spec, job.data, job.train, cfg).metrics


def run_baseline(cfg: Mapping[str, Any], data_root: str = "") -> dict[str, float]:
    """Load data, build the model, train, log; returns the final metrics."""
    job = prepare(cfg, data_root)
    data_md5 = fingerprint(cfg["dataset"], cfg["size"], data_root)  # a resume checks it reads the same file
    with tracking.tracked_run("baseline", cfg["dataset"], {**job.tags, "data_md5": data_md5}, run_name=job.name):
        outcome = fit_and_log(job.model, job.spec, job.data, job.train, cfg)
    return outcome.metrics


def resume_baseline(run_id: str, dataset: str, data_root: str = "", device: str = "", other_data: bool = False) -> dict[str, float]:
    """Reopen a KILLED, FAILED or stale baseline run and finish it from its `last.pt`.

    The run's own config (stored in the checkpoint, checked against its `config_hash` tag) is
    used; only the device may change. The data file must be the one the run started on (its
    `data_md5` tag) unless `other_data`. Every check runs before the run is reopened.
    """
    run = tracking.resumable_run("baseline", dataset, run_id)
    path = tracking.download_artifact(run_id, "checkpoints/last.pt")
    checkpoint = load_train_state(path)
    cfg = checkpoint["config"]
    if config_hash(cfg) != run.data.tags.get("config_hash"):
        raise UserError(f"checkpoints/last.pt of run {run_id} was not written with this run's config (config_hash differs)")
    state = checkpoint["train_state"]
    tracking.check_same_data(run, fingerprint(cfg["dataset"], cfg["size"], data_root), other_data)
    job = prepare(cfg, data_root, device)
    load_weights(job.model, state["model"], f"checkpoints/last.pt of run {run_id}", cfg["model"])
    check_resume_state(job.model, cfg, state, f"checkpoints/last.pt of run {run_id}")
    logged = tracking.last_logged_step(run_id, "train_loss")
    with tracking.tracked_run("baseline", dataset, {**job.tags, "resumed_from_epoch": state["epoch"]}, resume_run_id=run_id):
        outcome = fit_and_log(job.model, job.spec, job.data, job.train, cfg, resume=state, logged_through=logged)
    return outcome.metrics
