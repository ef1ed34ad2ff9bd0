"""Week 3 augmentation ablation: one parent run, one nested supervised classifier per (variant × seed).

Each child is a full classifier run (`pipeline.supervised.train_supervised`, stage `augment_ablation`,
tags `augment` and `seed`). The parent aggregates the children's val/test AUROC, accuracy and test ECE per
variant (mean ± sample std over seeds) into `ablation.csv`, `ablation.md`, a plot and metrics. A
child that fails does not stop the others (every grid's policy, `grids.run_cells`); the parent then
ends FAILED naming the failed children.
"""

from __future__ import annotations

import re
from typing import Any, Mapping


from pipeline import config, plots, tables, tracking
from pipeline.config import config_hash
from pipeline.data import load_splits
from pipeline.grids import GRID_GUIDE, raise_failures, run_cells
from pipeline.results import ABLATION_METRICS, ablation_summary
from pipeline.runtime import configure_speed, resolve_device
from pipeline.supervised import log_selected_model, train_supervised


def child_config(cfg: Mapping[str, Any], variant: str, seed: int) -> dict[str, Any]:
    """The classifier config of one child: a baseline config with the ablation's settings, one preset and one seed."""
    return config.derive(cfg, {"augment": variant, "seed": seed}, stage="baseline")


def summary_csv(summary: list[Mapping[str, Any]]) -> str:
    """ablation.csv: variant, n, then mean and std of each metric."""
    header = ["variant", "n"] + [f"{m}_{s}" for m in ABLATION_METRICS for s in ("mean", "std")]
    lines = [",".join(header)]
    for entry in summary:
        lines.append(",".join([entry["variant"], str(entry["n"])] + [f"{entry[h]:.6g}" for h in header[2:]]))
    return "\n".join(lines) + "\n"


def summary_markdown(summary: list[Mapping[str, Any]], title: str) -> str:
    """ablation.md: one row per variant, metrics as mean ± std over seeds."""
    lines = [f"# {title}", "", "| variant | n | " + " | ".join(m.replace("_", " ") for m in ABLATION_METRICS) + " |", "|---|---|" + "---|" * len(ABLATION_METRICS)]
    for entry in summary:
        lines.append(f"| {entry['variant']} | {entry['n']} | " + " | ".join(tables.mean_std(entry, m) for m in ABLATION_METRICS) + " |")
    return "\n".join(lines) + "\n\nmean ± sample std (ddof=1) over seeds; n = finished child runs.\n"


def metric_key(variant: str) -> str:
    """A variant name usable in MLflow metric keys (`geometric+intensity` → `geometric_intensity`)."""
    return re.sub(r"[^\w\-. ]", "_", variant)


def summary_metrics(summary: list[Mapping[str, Any]]) -> dict[str, float]:
    """Parent metrics `<variant>/<metric>_mean` and `_std` (NaN std for a single seed)."""
    return {f"{metric_key(e['variant'])}/{m}_{s}": e[f"{m}_{s}"] for e in summary for m in ABLATION_METRICS for s in ("mean", "std")}


def run_augment_ablation(cfg: Mapping[str, Any], data_root: str = "") -> list[dict[str, Any]]:
    """Train every (variant × seed) child inside one parent run and log the aggregate; returns the summary."""
    device = resolve_device(cfg["device"])
    configure_speed(device, cfg.get("deterministic", False))
    data = load_splits(cfg["dataset"], cfg["size"], data_root, device)
    tags = {
        "model": cfg["model"],
        "seed": ",".join(map(str, cfg["seeds"])),
        "variants": ",".join(cfg["variants"]),
        "finetune": cfg["finetune"],
        "config_hash": config_hash(cfg),
    }
    with tracking.tracked_run("augment_ablation", cfg["dataset"], tags, run_name=f"augment_ablation-{cfg['model']}"):
        tracking.log_config(cfg)
        cells = [(f"ablation-{variant}-s{seed}", (variant, seed)) for variant in cfg["variants"] for seed in cfg["seeds"]]

        def child(cell: tuple[str, int]) -> Mapping[str, Any]:
            variant, seed = cell
            return train_supervised(child_config(cfg, variant, seed), data, device, "augment_ablation", f"ablation-{variant}-s{seed}", nested=True)

        done, failures = run_cells(cells, child)
        rows = [{"variant": v, "seed": s, **{m: values[m] for m in ABLATION_METRICS}, "run_id": values["run_id"]} for (v, s), values in done]
        log_selected_model(rows, data, cfg["dataset"])
        summary = ablation_summary(rows, cfg["variants"])
        if summary:
            log_summary(summary, rows, cfg)
        raise_failures(failures, len(cfg["variants"]) * len(cfg["seeds"]), "ablation")
    return summary


def log_summary(summary: list[Mapping[str, Any]], rows: list[Mapping[str, Any]], cfg: Mapping[str, Any]) -> None:
    """Log the parent's tables, per-variant metrics and the error-bar plot."""
    title = f"Augmentation ablation: {cfg['dataset']} {cfg['model']}, {cfg['epochs']} epochs"
    tracking.log_text(summary_csv(summary), "ablation.csv")
    text = summary_markdown(summary, title)
    tracking.log_text(text, "ablation.md")
    tracking.describe_run(text + GRID_GUIDE)
    tracking.log_json(rows, "ablation_runs.json")
    tracking.log_metrics(summary_metrics(summary))
    tracking.log_figure(plots.ablation_errorbars(summary, "test_auroc", f"{title}\ntest AUROC per variant"), "plots/ablation_test_auroc.png")
