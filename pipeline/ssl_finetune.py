"""Week 6: fine-tune the SSL encoder end to end (encoder lr = lr × encoder_lr_scale, new head at
lr) at several label fractions × seeds, and compare with the probes and supervised baselines.

The week-6 table reads the probe and supervised-only results from the newest FINISHED
`linear_probe` run that used the same SSL run, and the full-label baselines from `baseline` runs;
what is missing is shown as missing, never recomputed here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from mlflow.entities import Run

from pipeline import config, tables, tracking
from pipeline.checkpoint import load_classifier
from pipeline.data import load_splits
from pipeline.linear_probe import METHOD_LABELS, label_efficiency_figure, run_grid
from pipeline.runtime import configure_speed, prepare_model, resolve_device, seed_everything
from pipeline.ssl_pretrain import load_encoder_checkpoint
from pipeline.supervised import fit_and_log

TABLE_KEYS = ("test_acc", "test_auroc", "test_ece")


# Config keys that do not change what a baseline learns (or are columns of the table themselves).
NOT_RECIPE = {"seed", "label_fraction", "dataset", "device", "amp", "channels_last", "compile", "checkpoint_every",
              "checkpoint_min_seconds", "eval_batch_size", "bootstrap", "ece_bins"}


def recipe_hash(run: Run) -> str:
    """A short hash of every logged setting that shapes what a classifier learns (lr, optimizer,
    size, epochs, ...): runs with the same recipe differ only by seed."""
    settings = tracking.logged_config(run)
    return config.config_hash({k: v for k, v in settings.items() if k not in NOT_RECIPE})[:6]


def baseline_label(run: Run) -> str:
    """How a baseline run is named in the week-6 table: its model, stem, weights, fine-tuning, epochs
    and augmentation, plus its recipe hash, so runs of different recipes are never averaged as if
    they were seeds."""
    tags, settings = run.data.tags, tracking.logged_config(run)
    recipe = recipe_hash(run)
    model = tags.get("model", "?")
    stem = f"/{settings.get('stem', '?')}" if model == "resnet18" else ""
    weights = ", ImageNet weights" if settings.get("weights") == "imagenet" else ""
    return (f"baseline {model}{stem}{weights} ({tags.get('finetune', 'all')}, {settings.get('epochs', '?')} epochs, "
            f"augment {settings.get('augment', '?')}; recipe {recipe})")


def run_rows(runs: list[Run], label: Callable[[Run], str] = lambda run: run.data.tags.get("method", "?")) -> list[dict[str, Any]]:
    """Result rows (method label, label_fraction, seed, test metrics, run_id) from classifier runs
    (newest first); of runs with the same label, fraction and seed only the newest counts."""
    rows, seen = [], set()
    for run in runs:
        tags, values = run.data.tags, run.data.metrics
        key = (label(run), float(tags.get("label_fraction", 1.0)), tags.get("seed"))
        if not all(k in values for k in TABLE_KEYS) or key in seen:
            continue
        seen.add(key)
        rows.append({"method": key[0], "label_fraction": key[1], "seed": key[2],
                     **{k: values[k] for k in TABLE_KEYS}, "run_id": run.info.run_id})
    return rows


def comparison_rows(dataset: str, ssl_run_id: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Probe, supervised-only and baseline rows for the week-6 table, and notes on what is missing."""
    notes = []
    parents = tracking.stage_parents(dataset, "linear_probe", f"tags.source_run_id = '{ssl_run_id}'")
    rows: list[dict[str, Any]] = []
    if parents:
        rows += run_rows(tracking.child_runs(parents[0].info.run_id, dataset))
    else:
        notes.append(f"no FINISHED linear_probe run for SSL run {ssl_run_id}: probe and supervised-only rows missing")
    baselines = tracking.finished_runs(dataset, "tags.stage = 'baseline' and tags.kind = 'classifier'")
    rows += run_rows(baselines, baseline_label)
    if not baselines:
        notes.append("no FINISHED baseline run: baseline rows missing")
    return rows, notes


def log_week6_table(finetune_rows: list[dict[str, Any]], ssl_run_id: str, dataset: str) -> list[dict[str, Any]]:
    """The week-6 comparison (Acc, AUROC, ECE, mean ± std) as CSV and Markdown, plus a figure."""
    others, notes = comparison_rows(dataset, ssl_run_id)
    summary = tables.aggregate(finetune_rows + others, ("method", "label_fraction"), TABLE_KEYS)
    summary.sort(key=lambda r: (r["label_fraction"], r["method"]))
    columns = ["method", "label_fraction", "n"] + [f"{k}_{s}" for k in TABLE_KEYS for s in ("mean", "std")]
    tracking.log_text(tables.to_csv(summary, columns), "week6_comparison.csv")
    header = ["method", "labels", "n", "test acc", "test AUROC", "test ECE"]
    body = [[METHOD_LABELS.get(r["method"], r["method"]), f"{r['label_fraction']:.0%}", r["n"],
             tables.mean_std(r, "test_acc"), tables.mean_std(r, "test_auroc"), tables.mean_std(r, "test_ece")]
            for r in summary]
    text = (f"# {dataset}: SSL probe vs. SSL fine-tune vs. supervised (SSL run {ssl_run_id})\n\n"
            "mean ± sample std (ddof 1) over seeds; test split; ECE = top-label, 10 equal-width bins.\n\n"
            + tables.rows_to_markdown(body, header) + "".join(f"\n- {n}" for n in notes) + "\n")
    tracking.log_text(text, "week6_comparison.md")
    grid = [r for r in summary if r["method"] in METHOD_LABELS]
    title = f"{dataset}: fine-tune vs. probe"
    tracking.log_figure(label_efficiency_figure(grid, "test_auroc", title), "plots/week6_auroc.png")
    return summary


def run_ssl_finetune(cfg: Mapping[str, Any], data_root: str = "") -> list[dict[str, Any]]:
    """Fine-tune at every fraction × seed under one parent run; returns the week-6 summary rows."""
    device = resolve_device(cfg["device"])
    configure_speed(device)
    encoder_path, ssl_run = load_encoder_checkpoint(cfg["ssl_run_id"], cfg["dataset"])
    _, checkpoint = load_classifier(encoder_path, device)
    data = load_splits(cfg["dataset"], checkpoint["config"]["size"], data_root, device)
    source = ssl_run.info.run_id

    def child(subset: np.ndarray, tags: dict[str, Any]) -> Mapping[str, float]:
        model, _ = load_classifier(encoder_path, device)
        seed_everything(tags["seed"])
        model.head.reset_parameters()
        model.set_dropout(cfg["dropout"])
        model = prepare_model(model.train(), device, cfg)
        child_cfg = {**cfg, "seed": tags["seed"], "label_fraction": tags["label_fraction"],
                     "model": model.spec.model, "stem": model.spec.stem, "size": data.size}
        name = f"ssl_finetune-f{tags['label_fraction']}-s{tags['seed']}"
        with tracking.tracked_run("ssl_finetune", cfg["dataset"], {**tags, "source_run_id": source}, run_name=name,
                                  nested=True) as run:
            values = fit_and_log(model, model.spec, data, data.train.subset(subset), child_cfg).metrics
        return {**values, "run_id": run.info.run_id}

    spec_model = checkpoint["spec"]["model"]
    parent_tags = {"model": spec_model, "seed": ",".join(map(str, cfg["seeds"])), "source_run_id": source,
                   "ssl_method": ssl_run.data.tags.get("method", ""), "config_hash": config.config_hash(cfg)}
    with tracking.tracked_run("ssl_finetune", cfg["dataset"], parent_tags, run_name=f"ssl-finetune-{spec_model}"):
        tracking.log_config(cfg)
        rows = run_grid(cfg, data, child, ["ssl_finetune"], {"model": spec_model})
        return log_week6_table(rows, source, cfg["dataset"])

