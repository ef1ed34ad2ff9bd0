"""Week 2–3 supervised baselines: one classifier trained from a resolved `baseline` config, or an
interrupted baseline run resumed from its `checkpoints/last.pt`."""

from __future__ import annotations

from typing import Any, Mapping


from pipeline import tracking
from pipeline.checkpoint import load_train_state, load_weights
from pipeline.config import config_hash
from pipeline.data import fingerprint, load_splits
from pipeline.errors import UserError
from pipeline.runtime import configure_speed, resolve_device
from pipeline.supervised import Prepared, build_job, fit_and_log
from pipeline.train import TrainSettings, check_resume_state


def prepare(cfg: Mapping[str, Any], data_root: str, device: str = "") -> Prepared:
    """Load data and build the model on `device` (default: the config's); mistakes surface here,
    before any run opens."""
    target = resolve_device(device or cfg["device"])
    configure_speed(target, cfg.get("deterministic", False))
    data = load_splits(cfg["dataset"], cfg["size"], data_root, target)
    return build_job(cfg, data, target, f"baseline-{cfg['model']}-{cfg['finetune']}-s{cfg['seed']}")


def run_baseline(cfg: Mapping[str, Any], data_root: str = "") -> dict[str, float]:
    """Load data, build the model, train, log; returns the final metrics."""
    job = prepare(cfg, data_root)
    data_md5 = fingerprint(cfg["dataset"], cfg["size"], data_root)  # a resume checks it reads the same file
    with tracking.tracked_run("baseline", cfg["dataset"], {**job.tags, "data_md5": data_md5}, run_name=job.name):
        outcome = fit_and_log(job.model, job.spec, job.data, job.train, cfg, with_model=True)
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
    if config_hash(cfg) != run.tags.get("config_hash"):
        raise UserError(f"checkpoints/last.pt of run {run_id} was not written with this run's config (config_hash differs)")
    state = checkpoint["train_state"]
    tracking.check_same_data(run, fingerprint(cfg["dataset"], cfg["size"], data_root), other_data)
    job = prepare(cfg, data_root, device)
    load_weights(job.model, state["model"], f"checkpoints/last.pt of run {run_id}", cfg["model"])
    check_resume_state(job.model, TrainSettings.of(cfg), state, f"checkpoints/last.pt of run {run_id}")
    logged = tracking.last_logged_step(run_id, "train_loss")
    with tracking.tracked_run("baseline", dataset, {**job.tags, "resumed_from_epoch": state["epoch"]}, resume_run_id=run_id):
        outcome = fit_and_log(job.model, job.spec, job.data, job.train, cfg, resume=state, logged_through=logged, with_model=True)
    return outcome.metrics
