"""Week 2–3 supervised baselines: one classifier trained from a resolved `baseline` config."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline import tracking
from pipeline.config import config_hash
from pipeline.data import DatasetSplits, load_splits, stratified_subset
from pipeline.models import build_classifier
from pipeline.runtime import configure_speed, resolve_device, seed_everything
from pipeline.supervised import fit_and_log, model_spec, prepare_for_device


def run_baseline(cfg: Mapping[str, Any], data_root: str = "") -> dict[str, float]:
    """Load data, build the model (mistakes surface before any run opens), train, log; returns metrics."""
    device = resolve_device(cfg["device"])
    configure_speed(device)
    data = load_splits(cfg["dataset"], cfg["size"], data_root, device)
    name = f"baseline-{cfg['model']}-{cfg['finetune']}-s{cfg['seed']}"
    return train_supervised(cfg, data, device, "baseline", name)


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


def train_supervised(
    cfg: Mapping[str, Any], data: DatasetSplits, device: torch.device, stage: str, name: str, nested: bool = False
) -> dict[str, float]:
    """Seed, build the model, train on the label subset and log one classifier run; returns metrics."""
    seed_everything(cfg["seed"])
    spec = model_spec(cfg, data.channels)
    model = prepare_for_device(build_classifier(spec, cfg["finetune"]), device)
    train = data.train.subset(stratified_subset(data.train.labels.cpu().numpy(), cfg["label_fraction"], cfg["seed"]))
    with tracking.tracked_run(stage, cfg["dataset"], supervised_tags(cfg), run_name=name, nested=nested):
        outcome = fit_and_log(model, spec, data, train, cfg)
    return outcome.metrics

