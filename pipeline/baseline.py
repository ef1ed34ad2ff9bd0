"""Week 2–3 supervised baselines: one classifier trained from a resolved `baseline` config."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline import tracking
from pipeline.config import config_hash
from pipeline.data import load_splits, stratified_subset
from pipeline.models import build_classifier
from pipeline.runtime import configure_speed, resolve_device, seed_everything
from pipeline.supervised import fit_and_log, model_spec, prepare_for_device


def run_baseline(cfg: Mapping[str, Any], data_root: str = "") -> dict[str, float]:
    """Load data, build the model (mistakes surface before any run opens), train, log; returns metrics."""
    device = resolve_device(cfg["device"])
    configure_speed(device)
    seed_everything(cfg["seed"])
    data = load_splits(cfg["dataset"], cfg["size"], data_root, device)
    spec = model_spec(cfg, data.channels)
    model = prepare_for_device(build_classifier(spec, cfg["finetune"]), device)
    train = data.train.subset(stratified_subset(data.train.labels.cpu().numpy(), cfg["label_fraction"], cfg["seed"]))
    tags = {
        "model": cfg["model"],
        "seed": cfg["seed"],
        "method": "supervised",
        "finetune": cfg["finetune"],
        "label_fraction": cfg["label_fraction"],
        "config_hash": config_hash(cfg),
    }
    name = f"baseline-{cfg['model']}-{cfg['finetune']}-s{cfg['seed']}"
    with tracking.tracked_run("baseline", cfg["dataset"], tags, run_name=name):
        outcome = fit_and_log(model, spec, data, train, cfg)
    return outcome.metrics

