"""Week 4: the `ssl_pretrain` step — pretrain an encoder with SimCLR-lite or MoCo-lite and log it.

Artifacts: `ssl_config.json` (τ, batch, queue, momentum, augmentations), `plots/ssl_loss.png`,
`checkpoints/encoder.pt` (classifier-format checkpoint: normalisation + encoder, untrained head)
and `checkpoints/last.pt` every few hundred steps, from which `resume` continues an interrupted run.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt

from tqdm.auto import tqdm

from pipeline import lineage, tracking
from pipeline.augment import SSL_VIEW_DESCRIPTION
from pipeline.checkpoint import CheckpointSchedule, load_checkpoint, save_checkpoint
from pipeline.config import config_hash
from pipeline.data import fingerprint, load_splits
from pipeline.errors import UserError
from pipeline.models import ModelSpec, build_classifier
from pipeline.pretrain import PretrainSettings, check_resume_state, pretrain, steps_per_epoch
from pipeline.runtime import configure_speed, prepare_model, resolve_device, seed_everything
from pipeline.ssl import build_ssl


def ssl_loss_figure(history: list[dict[str, float]], title: str) -> plt.Figure:
    """SSL loss and the kNN validation AUROC against optimizer steps, side by side; the kNN panel
    starts at step 0, the random initialisation, so the gain of pretraining is visible."""
    trained = [row for row in history if row["step"] > 0]
    fig, (loss_ax, knn_ax) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    loss_ax.plot([r["step"] for r in trained], [r["ssl_loss"] for r in trained], "o-", ms=3, label="contrastive loss")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("ssl_loss (mean since the previous point)")
    loss_ax.set_title(f"final loss {history[-1]['ssl_loss']:.3f}")
    loss_ax.legend()
    knn_ax.plot([r["step"] for r in history], [r["knn_val_auroc"] for r in history], "o-", ms=3, color="tab:green", label="kNN val AUROC")
    knn_ax.axhline(history[0]["knn_val_auroc"], color="tab:red", linestyle="--", label="random init (step 0)")
    knn_ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    knn_ax.set_xlabel("optimizer step")
    knn_ax.set_ylabel("AUROC")
    knn_ax.set_title(f"kNN monitor: {history[0]['knn_val_auroc']:.3f} at init, {history[-1]['knn_val_auroc']:.3f} at the end")
    knn_ax.legend()
    fig.suptitle(title)
    return fig


def ssl_settings(cfg: Mapping[str, Any], n: int) -> dict[str, Any]:
    """The settings a reader of the paper needs, as logged in `ssl_config.json` (`n`: training images);
    the budget both in optimizer steps and in epochs."""
    steps = PretrainSettings.of(cfg).total_steps(n)
    keys = ["method", "model", "stem", "batch_size", "lr", "weight_decay", "warmup_steps", "temperature", "proj_hidden_dim", "proj_dim", "seed", "size"]
    settings = {**{k: cfg[k] for k in keys}, "steps": steps, "epochs": steps / steps_per_epoch(n, cfg["batch_size"])}
    if cfg["method"] == "moco":
        settings.update(
            queue_size=cfg["queue_size"],
            moco_momentum=cfg["moco_momentum"],
            bn_splits=cfg["bn_splits"],
            key_init_share_at_half=key_init_share(cfg["moco_momentum"], steps // 2),
        )
    settings["augmentations"] = SSL_VIEW_DESCRIPTION
    return settings


def key_init_share(momentum: float, steps: int) -> float:
    """The weight the key encoder of MoCo still gives its random initialisation after `steps`
    momentum updates (momentum^steps)."""
    return momentum**steps


def _resume_state(cfg: Mapping[str, Any], resume_run_id: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Config and training state from an interrupted run's `checkpoints/last.pt`, and the last
    step it already logged (those steps are not logged again)."""
    run = tracking.resumable_run("ssl_pretrain", cfg["dataset"], resume_run_id)
    data = load_checkpoint(tracking.download_artifact(run.id, "checkpoints/last.pt"))
    if "train_state" not in data or "step" not in data["train_state"]:
        raise UserError(f"run {resume_run_id}'s last.pt holds no step-budgeted training state; start a new run instead")
    return dict(data["config"]), data["train_state"], tracking.last_logged_step(run.id, "knn_val_auroc")


def check_settings(cfg: Mapping[str, Any]) -> None:
    """MoCo's batch-norm chunks must divide the batch into chunks of at least two images."""
    splits, batch = cfg["bn_splits"], cfg["batch_size"]
    if cfg["method"] == "moco" and splits > 1 and (batch % splits or batch // splits < 2):
        raise UserError(
            f"bn_splits={splits} must divide batch_size={batch} into chunks of at least 2 images "
            "(MoCo's shuffling BN); choose another batch size, or bn_splits=1 for plain BN"
        )


def run_ssl_pretrain(cfg: Mapping[str, Any], data_root: str = "", resume_run_id: str = "", other_data: bool = False) -> dict[str, float]:
    """Pretrain, log every epoch and the artifacts; returns the final epoch's metrics.

    With `resume_run_id` (an interrupted run: KILLED, FAILED or stale), that run is reopened and
    training continues from its last checkpoint with the checkpoint's configuration, on the data file
    it started on unless `other_data`.
    """
    state, logged_through = None, 0
    if resume_run_id:
        cfg, state, logged_through = _resume_state(cfg, resume_run_id)
    check_settings(cfg)
    data_md5 = fingerprint(cfg["dataset"], cfg["size"], data_root)
    if resume_run_id:  # the history must not mix two data files
        tracking.check_same_data(tracking.get_run(resume_run_id), data_md5, other_data)
    device = resolve_device(cfg["device"])
    configure_speed(device, cfg.get("deterministic", False))
    seed_everything(cfg["seed"])
    data = load_splits(cfg["dataset"], cfg["size"], data_root, device)
    spec = ModelSpec(model=cfg["model"], in_channels=data.channels, stem=cfg["stem"])
    module = prepare_model(build_ssl(cfg["method"], build_classifier(spec), cfg), device, cfg)
    if state is not None:
        check_resume_state(module, PretrainSettings.of(cfg), len(data.train), state, f"checkpoints/last.pt of run {resume_run_id}")
    tags = {"model": cfg["model"], "seed": cfg["seed"], "method": cfg["method"], "config_hash": config_hash(cfg), "data_md5": data_md5}
    name = f"ssl-{cfg['method']}-{cfg['model']}-s{cfg['seed']}"
    with (
        tracking.tracked_run("ssl_pretrain", cfg["dataset"], tags, run_name=name, resume_run_id=resume_run_id or None),
        tempfile.TemporaryDirectory(prefix="medmnist-ssl-") as tmp,
    ):
        settings = PretrainSettings.of(cfg)
        n, steps = len(data.train), settings.total_steps(len(data.train))
        if cfg["method"] == "moco" and key_init_share(cfg["moco_momentum"], steps // 2) > 0.01:
            tqdm.write(
                f"warning: moco_momentum={cfg['moco_momentum']} keeps {key_init_share(cfg['moco_momentum'], steps // 2):.0%} "
                f"of the key encoder's random init at mid-run ({steps} steps); lower it, e.g. to "
                f"{0.01 ** (2 / steps):.3f}"
            )
        if state is None:
            tracking.log_config(cfg)
            tracking.log_params({"total_steps": steps, "steps_per_epoch": steps_per_epoch(n, cfg["batch_size"])})
            tracking.log_json(ssl_settings(cfg, n), "ssl_config.json")
            tracking.log_inputs([lineage.split_input(data, "train"), lineage.split_input(data, "val")])
        else:
            tracking.set_tags({"resumed_from_step": state["step"]})

        schedule = CheckpointSchedule(cfg["checkpoint_every"], steps, cfg["checkpoint_min_seconds"])

        def on_monitor(step: int, row: dict[str, float], train_state) -> None:
            if step > logged_through or (step == 0 and state is None):
                tracking.log_metrics({k: v for k, v in row.items() if k not in ("step", "epoch") and math.isfinite(v)}, step=step)
            if step and schedule.due(step):
                last = save_checkpoint(Path(tmp) / "last.pt", module.backbone, spec, cfg, train_state=train_state())
                tracking.log_file(last, "checkpoints")

        history = pretrain(module, data, settings, on_monitor, resume=state)
        tracking.log_metrics({"knn_val_auroc_init": history[0]["knn_val_auroc"]})
        encoder = save_checkpoint(Path(tmp) / "encoder.pt", module.backbone, spec, cfg, ssl_method=cfg["method"])
        tracking.log_file(encoder, "checkpoints")
        title = f"{cfg['dataset']} {cfg['method']} {cfg['model']} (τ={cfg['temperature']}, batch {cfg['batch_size']})"
        tracking.log_figure(ssl_loss_figure(history, title), "plots/ssl_loss.png")
    return {**{k: v for k, v in history[-1].items() if k != "epoch"}, "knn_val_auroc_init": history[0]["knn_val_auroc"]}
