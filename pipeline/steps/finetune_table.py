"""Week 3 head-only vs. full fine-tuning: one table from two finished `baseline` runs.

Reads each run's final metrics and its per-epoch `val_log.jsonl` (no retraining) and writes a
Markdown/CSV table with an over/under-fitting hint, and says whether the two runs started from the
same weights and stem (only then do the rows differ in the fine-tuning mode alone). The fitting hint is a rule of thumb, stated in
the table: over-fitting when the last epoch's val loss exceeds its train loss by more than
OVERFIT_GAP; under-fitting when the last train loss is still above UNDERFIT_LOSS (BCE).
"""

from __future__ import annotations

import json
from typing import Any, Mapping


from pipeline import plots, tracking
from pipeline.errors import UserError
from pipeline.records import RunRecord

OVERFIT_GAP = 0.1
UNDERFIT_LOSS = 0.4
WEIGHTS = {"imagenet": "ImageNet weights", "none": "random weights"}  # a baseline's `weights`, in the table's words
COLUMNS = [
    "finetune",
    "run_id",
    "model",
    "weights",
    "stem",
    "epochs",
    "best_epoch",
    "train_loss_at_best",
    "val_loss_at_best",
    "gap_at_best",
    "gap_last",
    "val_auroc",
    "test_auroc",
    "test_acc",
    "test_ece",
    "fit_hint",
]


def fit_hint(train_loss_last: float, val_loss_last: float) -> str:
    """A rough reading of the final losses: over-fitting, under-fitting, or neither."""
    if val_loss_last - train_loss_last > OVERFIT_GAP:
        return "over-fitting? (val loss >> train loss)"
    if train_loss_last > UNDERFIT_LOSS:
        return "under-fitting? (train loss still high)"
    return "ok"


def table_row(run: RunRecord, history: list[Mapping[str, float]]) -> dict[str, Any]:
    """One table row from a baseline run and its per-epoch history."""
    metrics = tracking.final_metrics(run)
    best = int(metrics["best_epoch"])
    at_best = next(h for h in history if int(h["epoch"]) == best)
    last = history[-1]
    return {
        "finetune": run.tags.get("finetune", "?"),
        "run_id": run.id,
        "model": run.tags.get("model", "?"),
        "weights": run.config.get("weights", "?"),
        "stem": run.config.get("stem", "?"),
        "epochs": len(history),
        "best_epoch": best,
        "train_loss_at_best": at_best["train_loss"],
        "val_loss_at_best": at_best["val_loss"],
        "gap_at_best": at_best["val_loss"] - at_best["train_loss"],
        "gap_last": last["val_loss"] - last["train_loss"],
        "val_auroc": metrics["val_auroc"],
        "test_auroc": metrics["test_auroc"],
        "test_acc": metrics["test_acc"],
        "test_ece": metrics["test_ece"],
        "fit_hint": fit_hint(last["train_loss"], last["val_loss"]),
    }


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def start_note(head: Mapping[str, Any], full: Mapping[str, Any]) -> str:
    """Whether the head-only and full fine-tuning rows start from the same model, weights and stem."""
    starts = {
        mode: f"{row['model']} with {WEIGHTS.get(row['weights'], row['weights'] + ' weights')} and the {row['stem']} stem"
        for mode, row in (("head", head), ("all", full))
    }
    if starts["head"] == starts["all"]:
        return f"Same start: both runs begin from {starts['head']}, so the rows differ only in what is trained."
    return (
        f"Different starts: head-only from {starts['head']}, full fine-tuning from {starts['all']}; the rows differ in "
        "initialisation as well as in what is trained. For a like-for-like comparison, train the full fine-tuning "
        "baseline from the head-only one's weights and stem."
    )


def table_markdown(rows: list[Mapping[str, Any]], title: str) -> str:
    """The comparison (head-only row first) as a Markdown table with its starting points and legend."""
    lines = [f"# {title}", "", start_note(*rows), "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += [
        "",
        "gap = val loss - train loss (BCE); at_best: the selected (best val AUROC) epoch; last: the final epoch.",
        f"fit_hint: over-fitting? when gap_last > {OVERFIT_GAP}; under-fitting? when the last train loss > {UNDERFIT_LOSS}.",
    ]
    return "\n".join(lines) + "\n"


def table_csv(rows: list[Mapping[str, Any]]) -> str:
    """The comparison as CSV."""
    return "\n".join([",".join(COLUMNS)] + [",".join(_cell(r[c]) for c in COLUMNS) for r in rows]) + "\n"


def pick_run(dataset: str, finetune: str, run_id: str, model: str) -> RunRecord:
    """The baseline run for one fine-tuning mode: an explicit id (checked) or the newest FINISHED one."""
    if run_id != "latest":
        run = tracking.find_run("baseline", dataset, run_id)
        if run.tags.get("finetune") != finetune:
            raise UserError(f"run {run_id} has finetune={run.tags.get('finetune')!r}; expected {finetune!r}")
        return run
    return tracking.find_latest("baseline", dataset, {"finetune": finetune, **({"model": model} if model else {})})


def run_history(run_id: str) -> list[dict[str, float]]:
    """A run's per-epoch rows from its val_log.jsonl."""
    path = tracking.download_artifact(run_id, "val_log.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_finetune_table(cfg: Mapping[str, Any]) -> str:
    """Compare the head-only and full fine-tuning baselines; log the table to one run; returns Markdown."""
    dataset = cfg["dataset"]
    runs = {mode: pick_run(dataset, mode, cfg[f"{mode}_run_id"], cfg["filter_model"]) for mode in ("head", "all")}
    histories = {mode: run_history(run.id) for mode, run in runs.items()}
    rows = [table_row(runs[mode], histories[mode]) for mode in ("head", "all")]
    models = sorted({r["model"] for r in rows})
    title = f"{dataset}: head-only vs. full fine-tuning ({', '.join(models)})"
    markdown = table_markdown(rows, title)
    tags = {
        "model": ",".join(models),
        "seed": "-",
        "source_run_id": ",".join(run.id for run in runs.values()),
        "head_run_id": runs["head"].id,
        "all_run_id": runs["all"].id,
    }
    with tracking.tracked_run("finetune_table", dataset, tags, run_name=f"finetune_table-{dataset}"):
        tracking.log_config(cfg)
        tracking.log_text(markdown, "finetune_table.md")
        tracking.log_text(table_csv(rows), "finetune_table.csv")
        tracking.log_figure(plots.loss_curves_by_label(histories, f"{title}: losses per epoch"), "plots/finetune_losses.png")
    return markdown
