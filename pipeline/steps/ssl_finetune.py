"""Week 6: fine-tune the SSL encoder end to end (encoder lr = lr × encoder_lr_scale, new head at
lr) at several label fractions × seeds, and compare with the probes and supervised baselines.

Every fraction trains for the same number of optimizer steps (`steps`, converted to epochs of the
subset), so 1% of the labels is not starved at one step an epoch. The encoder's learning-rate scale
is chosen per fraction from the `encoder_lr_scale` grid on the first seed's validation AUROC
(trained in memory, not logged), then used for every seed. As in `linear_probe`, several
pretraining runs serve the subset seeds in turn. With `group_members` a fraction's seeds train
together as one grouped model (`pipeline/grouped_train.py`, each equal to its solo run) before their
child runs log them; a failure to choose the scale fails every child of its fraction.

The week-6 table reads the probe and supervised-only results from the newest FINISHED
`linear_probe` run that used the same SSL run, and the full-label baselines from `baseline` runs;
what is missing is shown as missing, never recomputed here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import config, paired, tables, tracking
from pipeline.augment import build_augment
from pipeline.checkpoint import load_classifier
from pipeline.data import DatasetSplits, load_splits
from pipeline.errors import UserError
from pipeline.grids import GRID_GUIDE, for_seed, load_encoder_checkpoint, majority_rows, raise_failures, run_grid, ssl_run_ids
from pipeline.models import Classifier
from pipeline.results import METHOD_LABELS, PAIRED_COLUMNS, SHOWN_KEYS, label_efficiency_figure, recipe_hash, run_rows
from pipeline.runtime import configure_speed, prepare_model, resolve_device, seed_everything
from pipeline.supervised import MemberRun, log_member, log_selected_model, train_together
from pipeline.train import TrainSettings, epochs_for_steps, eval_interval, train_classifier
from pipeline.records import RunRecord

FINETUNE_COMPARISONS = (("ssl_finetune", "supervised"), ("ssl_finetune", "ssl_probe"))


def baseline_label(run: RunRecord) -> str:
    """How a baseline run is named in the week-6 table: its model, stem, weights, fine-tuning, epochs
    and augmentation, plus its recipe hash, so runs of different recipes are never averaged as if
    they were seeds."""
    tags, settings = run.tags, run.config
    recipe = recipe_hash(run)
    model = tags.get("model", "?")
    stem = f"/{settings.get('stem', '?')}" if model == "resnet18" else ""
    weights = ", ImageNet weights" if settings.get("weights") == "imagenet" else ""
    return (
        f"baseline {model}{stem}{weights} ({tags.get('finetune', 'all')}, {settings.get('epochs', '?')} epochs, augment {settings.get('augment', '?')}; recipe {recipe})"
    )


def comparison_rows(dataset: str, ssl_run_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Probe, supervised-only and baseline rows for the week-6 table, and notes on what is missing."""
    notes = []
    parents = tracking.stage_parents(dataset, "linear_probe", f"tags.source_run_id = '{ssl_run_id}'")
    rows: list[dict[str, Any]] = []
    if parents:
        rows += run_rows(tracking.child_runs(parents[0].id, dataset))
    else:
        notes.append(f"no FINISHED linear_probe run for SSL run {ssl_run_id}: probe and supervised-only rows missing")
    baselines = tracking.finished_runs(dataset, "tags.stage = 'baseline' and tags.kind = 'classifier'")
    rows += run_rows(baselines, baseline_label)
    if not baselines:
        notes.append("no FINISHED baseline run: baseline rows missing")
    return rows, notes


def log_comparison_table(finetune_rows: list[dict[str, Any]], controls: list[dict[str, Any]], ssl_run_id: str, dataset: str) -> list[dict[str, Any]]:
    """The week-6 comparison (accuracy, balanced accuracy, AUROC, ECE, mean ± std) as CSV and
    Markdown, with the `controls` rows (majority class), plus a figure and the paired differences."""
    others, notes = comparison_rows(dataset, ssl_run_id)
    summary = tables.aggregate(finetune_rows + others + controls, ("method", "label_fraction"), SHOWN_KEYS)
    summary.sort(key=lambda r: (r["label_fraction"], r["method"]))
    columns = ["method", "label_fraction", "n"] + [f"{k}_{s}" for k in SHOWN_KEYS for s in ("mean", "std")]
    tracking.log_text(tables.to_csv(summary, columns), "week6_comparison.csv")
    header = ["method", "labels", "n", "test acc", "test balanced acc", "test AUROC", "test ECE"]
    body = [[METHOD_LABELS.get(r["method"], r["method"]), f"{r['label_fraction']:.0%}", r["n"], *(tables.mean_std(r, k) for k in SHOWN_KEYS)] for r in summary]
    text = (
        f"# {dataset}: SSL probe vs. SSL fine-tune vs. supervised (SSL run {ssl_run_id})\n\n"
        "mean ± sample std (ddof 1) over seeds; test split; ECE = top-label, 10 equal-width bins.\n\n"
        + tables.rows_to_markdown(body, header)
        + "".join(f"\n- {n}" for n in notes)
        + "\n"
    )
    tracking.log_text(text, "week6_comparison.md")
    tracking.describe_run(text + GRID_GUIDE)
    differences = paired.compare_methods(finetune_rows + others, FINETUNE_COMPARISONS)
    tracking.log_text(tables.to_csv(differences, PAIRED_COLUMNS), "paired_differences.csv")
    grid = [r for r in summary if r["method"] in METHOD_LABELS]
    title = f"{dataset}: fine-tune vs. probe"
    tracking.log_figure(label_efficiency_figure(grid, "test_auroc", title), "plots/week6_auroc.png")
    return summary


def finetune_model(encoder_path: Path, cfg: Mapping[str, Any], seed: int, device: torch.device) -> Classifier:
    """The pretrained encoder with a freshly initialised head (seeded), ready to train."""
    model, _ = load_classifier(encoder_path, device)
    seed_everything(seed)
    model.head.reset_parameters()
    model.set_dropout(cfg["dropout"])
    return prepare_model(model.train(), device, cfg)


def child_config(cfg: Mapping[str, Any], model: Classifier, seed: int, fraction: float, scale: float, n: int, size: int) -> dict[str, Any]:
    """A fine-tuning run's config: one seed, fraction and encoder lr scale, its step budget in epochs."""
    epochs = cfg["epochs"] or epochs_for_steps(cfg["steps"], n, cfg["batch_size"])
    return config.derive(
        cfg,
        {
            "seed": seed,
            "label_fraction": fraction,
            "encoder_lr_scale": scale,
            "epochs": epochs,
            "eval_every": eval_interval(epochs),
            "model": model.spec.model,
            "stem": model.spec.stem,
            "size": size,
        },
    )


def choose_scale(
    encoder_path: Path, data: DatasetSplits, subset: np.ndarray, cfg: Mapping[str, Any], fraction: float, seed: int, device: torch.device
) -> tuple[float, dict[float, float]]:
    """The encoder lr scale with the best validation AUROC on this subset (ties: the first listed),
    and every scale's score; a one-value grid is taken as it is."""
    grid = list(cfg["encoder_lr_scale"])
    if len(grid) == 1:
        return grid[0], {}
    scores = {}
    for scale in grid:
        model = finetune_model(encoder_path, cfg, seed, device)
        trial_cfg = child_config(cfg, model, seed, fraction, scale, len(subset), data.size)
        result = train_classifier(model, data.train.subset(subset), data.val, TrainSettings.of(trial_cfg), augment=build_augment(cfg["augment"]))
        scores[scale] = max((row["val_auroc"] for row in result.history if math.isfinite(row["val_auroc"])), default=-math.inf)
    return max(grid, key=lambda scale: scores[scale]), scores


def finetune_member(
    encoder_path: Path, data: DatasetSplits, subset: np.ndarray, cfg: Mapping[str, Any], seed: int, fraction: float, scale: float, device: torch.device
) -> MemberRun:
    """One seed's fine-tuning run at the chosen scale: its model, labelled subset and config."""
    model = finetune_model(encoder_path, cfg, seed, device)
    child_cfg = child_config(cfg, model, seed, fraction, scale, len(subset), data.size)
    return MemberRun(model, data.train.subset(subset), child_cfg)


def run_ssl_finetune(cfg: Mapping[str, Any], data_root: str = "") -> list[dict[str, Any]]:
    """Fine-tune at every fraction × seed under one parent run; returns the week-6 summary rows."""
    device = resolve_device(cfg["device"])
    configure_speed(device, cfg.get("deterministic", False))
    encoders = [load_encoder_checkpoint(run_id, cfg["dataset"]) for run_id in ssl_run_ids(cfg["ssl_run_id"])]
    _, checkpoint = load_classifier(encoders[0][0], device)
    data = load_splits(cfg["dataset"], checkpoint["config"]["size"], data_root, device)
    sources = [run.id for _, run in encoders]
    chosen: dict[float, float | Exception] = {}  # per fraction: the encoder lr scale, or why choosing it failed
    selection: list[dict[str, Any]] = []
    members: dict[tuple[float, int], MemberRun] = {}  # (fraction, seed): built, and trained with its fraction's seeds

    def ahead(fraction: float, subsets: dict[int, np.ndarray]) -> None:
        seed = cfg["seeds"][0]
        try:
            chosen[fraction], scores = choose_scale(for_seed(encoders, cfg["seeds"], seed)[0], data, subsets[seed], cfg, fraction, seed, device)
        except UserError:
            raise
        except Exception as exc:  # every child of the fraction fails with it, in its own run
            chosen[fraction] = exc
            return
        selection.append({"label_fraction": fraction, "seed": seed, "chosen": chosen[fraction], **{f"val_auroc_scale_{k:g}": v for k, v in scores.items()}})
        if cfg["group_members"]:
            group_fraction(fraction, subsets)

    def group_fraction(fraction: float, subsets: dict[int, np.ndarray]) -> None:
        built = {
            seed: finetune_member(for_seed(encoders, cfg["seeds"], seed)[0], data, subset, cfg, seed, fraction, chosen[fraction], device)
            for seed, subset in subsets.items()
        }
        why_not = train_together(list(built.values()), data.val)
        if why_not:
            tqdm.write(f"ssl_finetune: the seeds at {fraction:g} train one by one ({why_not})")
        members.update({(fraction, seed): member for seed, member in built.items()})

    def child(subset: np.ndarray, tags: dict[str, Any]) -> Mapping[str, float]:
        fraction, seed = tags["label_fraction"], tags["seed"]
        path, ssl_run = for_seed(encoders, cfg["seeds"], seed)
        member = members.pop((fraction, seed), None)
        if member is None and not isinstance(chosen[fraction], Exception):
            member = finetune_member(path, data, subset, cfg, seed, fraction, chosen[fraction], device)
        name = f"ssl_finetune-{tags['ssl_method']}-f{fraction}-s{seed}"
        child_tags = {
            **tags,
            "source_run_id": ssl_run.id,
            "pretrain_seed": ssl_run.tags.get("seed", ""),
            "grouped": str(member is not None and member.result is not None).lower(),
        }
        with tracking.tracked_run("ssl_finetune", cfg["dataset"], child_tags, run_name=name, nested=True) as run_id:
            if member is None:
                raise chosen[fraction]
            values = log_member(member, member.model.spec, data)
        return {**values, "run_id": run_id}

    spec_model = checkpoint["spec"]["model"]
    ssl_method = encoders[0][1].tags.get("method", "")
    parent_tags = {
        "model": spec_model,
        "seed": ",".join(map(str, cfg["seeds"])),
        "source_run_id": ",".join(sources),
        "ssl_method": ssl_method,
        "pretraining_runs": len(sources),
        "config_hash": config.config_hash(cfg),
    }
    with tracking.tracked_run("ssl_finetune", cfg["dataset"], parent_tags, run_name=f"ssl-finetune-{ssl_method}-{spec_model}"):
        tracking.log_config(cfg)
        rows, failures = run_grid(cfg, data, child, ["ssl_finetune"], {"model": spec_model, "ssl_method": ssl_method}, ahead)
        if not rows:
            raise_failures(failures, len(failures), "ssl_finetune")
        log_selected_model(rows, data, cfg["dataset"])
        tracking.log_json(selection, "encoder_lr_scale_selection.json")
        summary = log_comparison_table(rows, majority_rows(data, cfg), ",".join(sources), cfg["dataset"])
        raise_failures(failures, len(cfg["label_fractions"]) * len(cfg["seeds"]), "ssl_finetune")
        return summary
