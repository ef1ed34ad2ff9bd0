"""Weeks 9–10: cross-week tables read back from the tracking store, written as Markdown, CSV and
LaTeX (booktabs) plus figures (`pipeline.render` writes them). Each table cites the run ids its rows came from; a stage with no
FINISHED run is reported as missing, never as zeros.
"""

from __future__ import annotations

import csv
import io
import json
import math
from itertools import groupby
from typing import Any, Collection, Mapping


from pipeline import paired, plots, results, tables, tracking
from pipeline.render import PAIRED_METRICS, SPREAD, Table, fmt, interval_text, plural, seed_list
from pipeline.results import METHOD_LABELS, SHOWN_KEYS, label_efficiency_figure, recipe_hash, run_rows
from pipeline.records import RunRecord


Scope = Collection[str] | None  # the run ids a study's compare may cite; None: the newest of each stage


def in_scope(runs: list[RunRecord], scope: Scope) -> list[RunRecord]:
    """The runs whose ids are in scope (all when there is no scope), in their order."""
    return runs if scope is None else [r for r in runs if r.id in scope]


def _missing(name: str, title: str, header: list[str], stage: str, dataset: str) -> Table:
    hint = f"missing: no FINISHED {stage} run for {dataset} (run `mlflow run . -e {stage} -P dataset={dataset} --env-manager local`)"
    return Table(name, title, header, missing=hint)


def class_balance_table(dataset: str, scope: Scope = None) -> Table:
    """Week 1: images per split and class, from the newest eda run."""
    header = ["split", "label", "class", "count", "fraction"]
    runs = in_scope(tracking.stage_parents(dataset, "eda"), scope)
    if not runs or not tracking.has_artifacts(runs[0].id, ("eda/summary.json",)):
        return _missing("week1_class_balance", "Class balance", header, "eda", dataset)
    run_id = runs[0].id
    records = json.loads(tracking.download_artifact(run_id, "eda/summary.json").read_text())["class_balance"]
    table = Table("week1_class_balance", f"Class balance per split (eda run {run_id[:8]})", header)
    for record in records:
        table.records.append({**record, "run_id": run_id})
        table.rows.append([record["split"], record["label"], record["class"], record["count"], fmt(record["fraction"])])
    return table


def head_vs_full_table(dataset: str, scope: Scope = None) -> Table:
    """Week 3: head-only vs. full fine-tuning of ResNet-18, from the newest finetune_table run."""
    header = ["finetune", "model", "weights", "stem", "epochs", "best epoch", "gap at best", "val AUROC", "test AUROC", "test acc", "test ECE", "run"]
    runs = in_scope(tracking.stage_parents(dataset, "finetune_table"), scope)
    if not runs or not tracking.has_artifacts(runs[0].id, ("finetune_table.csv",)):
        return _missing("week3_head_vs_full", "Head-only vs. full fine-tuning", header, "finetune_table", dataset)
    run_id = runs[0].id
    records = list(csv.DictReader(io.StringIO(tracking.download_artifact(run_id, "finetune_table.csv").read_text())))
    table = Table("week3_head_vs_full", f"Head-only vs. full fine-tuning (finetune_table run {run_id[:8]})", header)
    for record in records:
        table.records.append({**record, "parent_run_id": run_id})
        cell = record.get  # runs logged before a column existed lack it
        table.rows.append(
            [
                cell("finetune", ""),
                cell("model", ""),
                cell("weights", ""),
                cell("stem", ""),
                cell("epochs", ""),
                cell("best_epoch", ""),
                fmt(cell("gap_at_best")),
                fmt(cell("val_auroc")),
                fmt(cell("test_auroc")),
                fmt(cell("test_acc")),
                fmt(cell("test_ece")),
                cell("run_id", "")[:8],
            ]
        )
    return table


def baseline_key(model: str, finetune: str, weights: str) -> str:
    """A baseline's name in the hand-ins and the week-6 table: `smallcnn`, `resnet18_head`,
    `resnet18_full` (from ImageNet weights) or `resnet18_scratch` (from random weights)."""
    if finetune == "head":
        return f"{model}_head"
    if model == "smallcnn":
        return model
    return f"{model}_{'full' if weights == 'imagenet' else 'scratch'}"


def baselines_table(dataset: str, scope: Scope = None) -> Table:
    """Week 2: every FINISHED baseline classifier (model, fine-tuning, labels) with val/test metrics."""
    header = ["model", "finetune", "weights", "augment", "epochs", "lr", "recipe", "labels", "seed", "val acc", "test acc", "test AUROC", "test ECE", "run"]
    runs = in_scope(tracking.finished_runs(dataset, "tags.stage = 'baseline' and tags.kind = 'classifier'"), scope)
    if not runs:
        return _missing("week2_baselines", "Supervised baselines", header, "baseline", dataset)
    table = Table("week2_baselines", "Supervised baselines (one row per run, newest first)", header)
    for run in runs:
        tags, params, m = run.tags, run.config, tracking.final_metrics(run)
        record = {
            "key": baseline_key(tags.get("model", "?"), tags.get("finetune", "all"), params.get("weights", "")),
            "model": tags.get("model"),
            "finetune": tags.get("finetune", "all"),
            "weights": params.get("weights", ""),
            "augment": params.get("augment", ""),
            "label_fraction": tags.get("label_fraction", "1.0"),
            "seed": tags.get("seed"),
            "epochs": params.get("epochs", ""),
            "lr": params.get("lr", ""),
            "batch_size": params.get("batch_size", ""),
            "recipe": recipe_hash(run),
            "val_acc": m.get("val_acc"),
            "val_auroc": m.get("val_auroc"),
            "test_acc": m.get("test_acc"),
            "test_auroc": m.get("test_auroc"),
            "test_ece": m.get("test_ece"),
            "run_id": run.id,
        }
        table.records.append(record)
        table.rows.append(
            [
                record["model"],
                record["finetune"],
                record["weights"],
                record["augment"],
                record["epochs"],
                record["lr"],
                record["recipe"],
                f"{float(record['label_fraction']):.0%}",
                record["seed"],
                fmt(m.get("val_acc")),
                fmt(m.get("test_acc")),
                fmt(m.get("test_auroc")),
                fmt(m.get("test_ece")),
                run.id[:8],
            ]
        )
    return table


def ssl_table(dataset: str, scope: Scope = None) -> Table:
    """Week 4: each FINISHED pretraining run's settings, final loss and kNN monitor."""
    header = ["method", "encoder", "seed", "τ", "batch", "queue", "BN splits", "steps", "final loss", "kNN val AUROC (init → end)", "run"]
    runs = in_scope(tracking.stage_parents(dataset, "ssl_pretrain"), scope)
    if not runs:
        return _missing("week4_ssl_pretraining", "SSL pretraining", header, "ssl_pretrain", dataset)
    table = Table("week4_ssl_pretraining", "SSL pretraining summary", header)
    for run in runs:
        p, m = run.config, run.metrics
        method = run.tags.get("method", "?")
        queue = p.get("queue_size", "") if method == "moco" else "—"
        splits = p.get("bn_splits", "1") if method == "moco" else "—"  # runs from before the key: plain BN
        record = {
            "method": method,
            "model": p.get("model"),
            "stem": p.get("stem"),
            "temperature": p.get("temperature"),
            "batch_size": p.get("batch_size"),
            "queue_size": queue,
            "bn_splits": splits,
            "steps": run.params.get("total_steps"),
            "seed": p.get("seed"),
            "final_ssl_loss": m.get("ssl_loss"),
            "knn_val_auroc_init": m.get("knn_val_auroc_init"),
            "knn_val_auroc": m.get("knn_val_auroc"),
            "run_id": run.id,
        }
        table.records.append(record)
        table.rows.append(
            [
                method,
                record["model"],
                record["seed"],
                record["temperature"],
                record["batch_size"],
                queue,
                splits,
                record["steps"],
                fmt(m.get("ssl_loss")),
                f"{fmt(m.get('knn_val_auroc_init'))} → {fmt(m.get('knn_val_auroc'))}",
                run.id[:8],
            ]
        )
    return table


def ablation_table(dataset: str, scope: Scope = None) -> Table:
    """Week 3: the newest augmentation ablation, its children per variant (mean ± std over seeds,
    as the ablation's own table), with the per-variant error-bar figure."""
    header = ["augmentation", "n", "val AUROC", "test acc", "test AUROC", "test ECE"]
    parents = in_scope(tracking.stage_parents(dataset, "augment_ablation"), scope)
    if not parents:
        return _missing("week3_augment_ablation", "Augmentation ablation", header, "augment_ablation", dataset)
    parent = parents[0]
    p = parent.config
    rows = [
        {"variant": run.tags.get("augment", "?"), "seed": run.tags.get("seed"), **tracking.final_metrics(run), "run_id": run.id}
        for run in tracking.child_runs(parent.id, dataset)
        if set(results.ABLATION_METRICS) <= set(tracking.final_metrics(run))
    ]
    variants = list(dict.fromkeys([*p.get("variants", "").split(","), *(r["variant"] for r in rows)]))
    summary = results.ablation_summary(rows, variants)
    what = f"Augmentation ablation ({p.get('model')}, {plural(p.get('epochs'), 'epoch')}, run {parent.id[:8]})"
    title = f"{what}, {SPREAD}"
    table = Table("week3_augment_ablation", title, header, settings={k: p.get(k, "") for k in ("model", "epochs", "variants", "seeds")})
    for entry in summary:
        mine = [r for r in rows if r["variant"] == entry["variant"]]
        table.records.append(
            {
                **{k: v for k, v in entry.items() if not k.endswith("_values")},
                "seeds": seed_list(mine),
                "run_ids": " ".join(r["run_id"] for r in mine),
                "parent_run_id": parent.id,
            }
        )
        table.rows.append([entry["variant"], entry["n"], *(tables.mean_std(entry, m) for m in ("val_auroc", "test_acc", "test_auroc", "test_ece"))])
    if summary:
        table.figure = plots.ablation_errorbars(summary, "test_auroc", f"{dataset}: {what}")
    return table


def child_rows(parent: RunRecord, dataset: str) -> list[dict[str, Any]]:
    """(method, fraction, seed, test metrics, run id) of a parent's FINISHED classifier children."""
    return run_rows(tracking.child_runs(parent.id, dataset))


def grouped_table(name: str, title: str, rows: list[dict[str, Any]]) -> Table:
    """Mean ± std over seeds per (method, label fraction), with n and the run ids."""
    header = ["method", "labels", "n", "test acc", "test balanced acc", "test AUROC", "test ECE"]
    summary = tables.aggregate(rows, ("method", "label_fraction"), SHOWN_KEYS)
    summary.sort(key=lambda r: (r["method"], r["label_fraction"]))
    table = Table(name, title, header)
    for row in summary:
        mine = [r for r in rows if (r["method"], r["label_fraction"]) == (row["method"], row["label_fraction"])]
        row.update(seeds=seed_list(mine), run_ids=" ".join(r["run_id"] for r in mine if r["run_id"]))
        table.records.append(row)
        table.rows.append(
            [METHOD_LABELS.get(row["method"], row["method"]), f"{row['label_fraction']:.0%}", row["n"], *(tables.mean_std(row, value) for value in SHOWN_KEYS)]
        )
    return table


def probe_parents(dataset: str, scope: Scope) -> tuple[list[RunRecord], dict[str, RunRecord]]:
    """The linear_probe parents in scope (newest first) and the newest one of each SSL method."""
    runs = in_scope(tracking.stage_parents(dataset, "linear_probe"), scope)
    newest: dict[str, RunRecord] = {}
    for run in runs:
        newest.setdefault(run.tags.get("ssl_method", "?"), run)
    return runs, newest


def label_efficiency_rows(dataset: str, scope: Scope) -> tuple[list[dict[str, Any]], RunRecord | None, dict[str, RunRecord]]:
    """Per-seed rows of week 5: supervised-only and control rows from the newest grid that trained
    them, SSL-probe rows from the newest grid of each SSL method (labelled with the method), the
    majority-class control recomputed from that grid's table; with the grids they came from."""
    runs, newest = probe_parents(dataset, scope)
    rows: list[dict[str, Any]] = []
    trainer = None
    for run in runs:
        rows = [r for r in child_rows(run, dataset) if r["method"] != "ssl_probe"]
        if rows:
            trainer = run
            break
    for ssl_method, parent in newest.items():
        probes = [r for r in child_rows(parent, dataset) if r["method"] == "ssl_probe"]
        rows += [{**r, "method": f"{METHOD_LABELS['ssl_probe']} ({ssl_method})"} for r in probes]
    return rows, trainer, newest


def majority_records(parent: RunRecord | None) -> list[dict[str, Any]]:
    """The majority-class control rows a linear_probe grid logged in its label_efficiency.csv."""
    if parent is None or not tracking.has_artifacts(parent.id, ("label_efficiency.csv",)):
        return []
    text = tracking.download_artifact(parent.id, "label_efficiency.csv").read_text()
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r["method"] == "majority_class"]
    return [
        {
            "method": "majority_class",
            "label_fraction": float(r["label_fraction"]),
            "n": int(r["n"]),
            "run_ids": "",
            **{k: float(v) if v else math.nan for k, v in r.items() if k.endswith(("_mean", "_std"))},
        }
        for r in rows
    ]


def add_majority_rows(table: Table, parent: RunRecord | None) -> None:
    """Append the majority-class control of a linear_probe grid to a grouped table."""
    for record in majority_records(parent):
        table.records.append(record)
        table.rows.append([METHOD_LABELS["majority_class"], f"{record['label_fraction']:.0%}", record["n"], *(tables.mean_std(record, v) for v in SHOWN_KEYS)])


def label_efficiency_table(dataset: str, scope: Scope = None) -> Table:
    """Week 5: the newest linear_probe parent per SSL method, children aggregated over seeds, with
    the random-encoder and majority-class controls."""
    rows, trainer, newest = label_efficiency_rows(dataset, scope)
    if not newest:
        return _missing("week5_label_efficiency", "Label efficiency", ["method", "labels", "n"], "linear_probe", dataset)
    table = grouped_table("week5_label_efficiency", f"Label efficiency: test metrics, {SPREAD}", rows)
    add_majority_rows(table, trainer)
    for parent in dict.fromkeys(p for p in [trainer, *newest.values()] if p is not None):
        for tag, value in parent.tags.items():
            if tag.endswith("_status") and value.startswith("not run"):
                table.not_run.append(f"{METHOD_LABELS.get(tag.removesuffix('_status'), tag)} ({parent.id[:8]}): {value.removeprefix('not run: ')}")
    settings: dict[str, str] = {}
    if trainer is not None:
        settings.update({k: trainer.config.get(k, "") for k in ("supervised_epochs", "supervised_steps", "supervised_augment")})
    # the settings of the grids the rows came from (the newest grid of each SSL method)
    grids = dict.fromkeys(parent.config.get("probe_cs", "") for parent in newest.values())
    settings.update(
        seeds=seed_list(rows, ","), probe_cs=" / ".join(grids), pretraining_runs=" / ".join(f"{m}: {p.tags.get('pretraining_runs', '1')}" for m, p in newest.items())
    )
    table.settings = settings
    grid = [r for r in table.records if r["n"] and r["method"] != "majority_class"]
    table.figure = label_efficiency_figure(grid, "test_auroc", f"{dataset}: label efficiency (AUROC)")
    return table


def finetune_rows(dataset: str, scope: Scope) -> list[dict[str, Any]]:
    """Per-seed rows of the newest ssl_finetune grid of each SSL method, labelled with the method."""
    newest: dict[str, RunRecord] = {}
    for run in in_scope(tracking.stage_parents(dataset, "ssl_finetune"), scope):
        newest.setdefault(run.tags.get("ssl_method", "?"), run)
    return [
        {**r, "method": f"{METHOD_LABELS['ssl_finetune']} ({m})"} for m, parent in newest.items() for r in child_rows(parent, dataset) if r["method"] == "ssl_finetune"
    ]


def paired_table(dataset: str, scope: Scope = None) -> Table:
    """Weeks 5–6, the study's answer: per SSL method and label fraction, the paired difference
    (same subset seed) of SSL probe and SSL fine-tune against supervised-only, of the probe against
    the random-encoder control, and of fine-tune against probe, with 95% t intervals and verdicts."""
    header = [
        "comparison",
        "labels",
        "n",
        *(f"Δ {m.removeprefix('test_')} [95% CI]" for m in PAIRED_METRICS),
        *(f"{m.removeprefix('test_')} verdict" for m in PAIRED_METRICS),
    ]
    rows, _, newest = label_efficiency_rows(dataset, scope)
    rows += finetune_rows(dataset, scope)
    records = []
    for m in newest:
        probe, tune = f"{METHOD_LABELS['ssl_probe']} ({m})", f"{METHOD_LABELS['ssl_finetune']} ({m})"
        comparisons = [(probe, "supervised"), (probe, "random_probe"), (tune, "supervised"), (tune, probe)]
        records += [{**r, "ssl_method": m} for r in paired.compare_methods(rows, comparisons, PAIRED_METRICS)]
    if not records:
        return _missing("week6_paired_differences", "Paired differences", header, "linear_probe", dataset)
    table = Table("week6_paired_differences", f"Paired differences a − b over subset seeds ({paired.INTERVAL})", header)
    for record in records:
        record["comparison"] = f"{record['a']} − {METHOD_LABELS.get(record['b'], record['b'])}"
        record["run_ids"] = " ".join(
            r["run_id"] for r in rows if r["method"] in (record["a"], record["b"]) and float(r["label_fraction"]) == record["label_fraction"] and r["run_id"]
        )
    table.records = records
    for (comparison, fraction), group in groupby(records, key=lambda r: (r["comparison"], r["label_fraction"])):
        cells = {r["metric"]: r for r in group}
        table.rows.append(
            [
                comparison,
                f"{fraction:.0%}",
                min(r["n"] for r in cells.values()),
                *(interval_text(cells.get(m)) for m in PAIRED_METRICS),
                *(cells[m]["verdict"] if m in cells else "—" for m in PAIRED_METRICS),
            ]
        )
    table.figure = plots.paired_differences(records, PAIRED_METRICS, f"{dataset}: paired differences (95% t intervals)")
    return table


def baseline_rows(dataset: str, scope: Scope) -> list[dict[str, Any]]:
    """Per-seed rows of the week-2 baselines, labelled `baseline <key>` (`baseline_key`)."""
    runs = in_scope(tracking.finished_runs(dataset, "tags.stage = 'baseline' and tags.kind = 'classifier'"), scope)
    return run_rows(runs, lambda run: "baseline " + baseline_key(run.tags.get("model", "?"), run.tags.get("finetune", "all"), run.config.get("weights", "")))


def probe_vs_finetune_table(dataset: str, scope: Scope = None) -> Table:
    """Week 6: SSL fine-tune vs. SSL probe vs. supervised-only at each fraction, with ECE, and the
    week-2 baselines (all labels) as reference rows."""
    finetunes = in_scope(tracking.stage_parents(dataset, "ssl_finetune"), scope)
    if not finetunes:
        return _missing("week6_probe_vs_finetune", "Probe vs. fine-tune", ["method", "labels", "n"], "ssl_finetune", dataset)
    latest = finetunes[0]
    rows = child_rows(latest, dataset)
    source = latest.tags.get("source_run_id", "")
    probes = [r for r in in_scope(tracking.stage_parents(dataset, "linear_probe"), scope) if r.tags.get("source_run_id") == source]
    if probes:
        rows += child_rows(probes[0], dataset)
    rows += baseline_rows(dataset, scope)
    table = grouped_table("week6_probe_vs_finetune", f"SSL fine-tune vs. probe vs. supervised, with the baselines (SSL run {source[:8]}), {SPREAD}", rows)
    add_majority_rows(table, probes[0] if probes else None)
    table.settings = {k: latest.config.get(k, "") for k in ("epochs", "steps", "lr", "encoder_lr_scale", "augment", "seeds")}
    if not probes:
        table.missing = f"missing: no FINISHED linear_probe run for SSL run {source}"
    return table


ANALYSED_LABELS = {"baseline": "baseline", "ssl_finetune": "SSL fine-tune"}


def analysed_of(run: RunRecord) -> str:
    """Which kind of classifier a post-hoc run analysed: the study's `analysed` tag, else the
    stage of its source run (`source_stage`)."""
    return run.tags.get("analysed") or run.tags.get("source_stage") or "baseline"


def newest_per_analysed(runs: list[RunRecord]) -> list[RunRecord]:
    """The newest run per analysed kind, the baseline's first (runs come newest first)."""
    newest: dict[str, RunRecord] = {}
    for run in runs:
        newest.setdefault(analysed_of(run), run)
    return sorted(newest.values(), key=lambda r: analysed_of(r) != "baseline")


def artifact_table(dataset: str, scope: Scope, stage: str, artifact: str, name: str, title: str, columns: list[str]) -> Table:
    """A table a step already logged as CSV: the newest FINISHED run of `stage` for each kind of
    model it analysed (baseline, SSL fine-tune), citing that run and the classifier it analysed."""
    runs = newest_per_analysed(in_scope(tracking.stage_parents(dataset, stage), scope))
    if not runs:
        return _missing(name, title, ["model", *columns], stage, dataset)
    lacking = [r for r in runs if not tracking.has_artifacts(r.id, (artifact,))]
    runs = [r for r in runs if r not in lacking]
    note = "; ".join(f"{stage} run {r.id[:8]} has no {artifact} (rerun {stage})" for r in lacking)
    if not runs:
        return Table(name, title, ["model", *columns], missing=f"missing: {note}")
    cited = ", ".join(f"{ANALYSED_LABELS.get(analysed_of(r), analysed_of(r))}: run {r.id[:8]}, source {r.tags.get('source_run_id', '')[:8]}" for r in runs)
    table = Table(
        name,
        f"{title} ({cited})",
        ["model", *columns],
        missing=f"missing: {note}" if note else "",
        settings={**runs[0].config, "source_run_id": runs[0].tags.get("source_run_id", "")},
    )
    for run in runs:
        text = tracking.download_artifact(run.id, artifact).read_text()
        analysed = ANALYSED_LABELS.get(analysed_of(run), analysed_of(run))
        source = run.tags.get("source_run_id", "")
        for record in csv.DictReader(io.StringIO(text)):
            table.records.append({"analysed": analysed, "analysed_kind": analysed_of(run), **record, "run_id": run.id, "source_run_id": source})
            table.rows.append([analysed, *(fmt(record.get(c)) if _needs_rounding(record.get(c)) else record.get(c, "") for c in columns)])
    return table


def _needs_rounding(value: Any) -> bool:
    """A non-integer number (integers such as severities are shown as they are)."""
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not str(value).isdigit()


def calibration_table(dataset: str, scope: Scope = None) -> Table:
    """Week 6: calibration before/after temperature scaling (and Platt/isotonic when fitted)."""
    return artifact_table(
        dataset,
        scope,
        "calibrate",
        "calibration/table.csv",
        "week6_calibration",
        "Calibration before/after",
        ["method", "split", "ece", "ece_eqfreq", "mce", "brier", "nll", "acc", "auroc"],
    )


def calibration_change_table(dataset: str, scope: Scope = None) -> Table:
    """Week 6: the test change of ECE, Brier and NLL under temperature scaling, with paired bootstrap
    95% intervals (validation numbers are in-sample: T was fitted there)."""
    return artifact_table(
        dataset,
        scope,
        "calibrate",
        "calibration/test_change.csv",
        "week6_calibration_change",
        "Calibration change on test (after − before, paired bootstrap 95% CI)",
        ["metric", "before", "after", "change", "ci_low", "ci_high", "verdict"],
    )


def thresholds_table(dataset: str, scope: Scope = None) -> Table:
    """Week 7: operating points chosen on validation, their test rates."""
    return artifact_table(
        dataset,
        scope,
        "thresholds",
        "thresholds/table.csv",
        "week7_thresholds",
        "Decision thresholds (test)",
        ["rule", "target", "status", "threshold", "tpr", "specificity", "fpr", "precision", "npv", "f1"],
    )


def robustness_table(dataset: str, scope: Scope = None) -> Table:
    """Week 8: AUROC, accuracy and ECE per corruption and severity."""
    return artifact_table(
        dataset,
        scope,
        "robustness",
        "robustness/table.csv",
        "week8_robustness",
        "Robustness to corruptions (test)",
        ["corruption", "severity", "level", "auroc", "acc", "ece", "auroc_drop"],
    )


def build_tables(dataset: str, scope: Scope = None) -> list[Table]:
    """Every cross-week table for a dataset, in study order: from the newest runs of each stage, or
    (a study's compare) from the runs in `scope` only."""
    builders = [
        class_balance_table,
        baselines_table,
        ablation_table,
        head_vs_full_table,
        ssl_table,
        label_efficiency_table,
        probe_vs_finetune_table,
        paired_table,
        calibration_table,
        calibration_change_table,
        thresholds_table,
        robustness_table,
    ]
    built = [build(dataset, scope) for build in builders]
    for table in built:
        if not table.rows and not table.missing:  # a run whose results were deleted or never finished
            table.missing = "missing: the newest FINISHED run of this stage has no FINISHED results"
    return built


STEP_TABLES = {
    "eda": "week1_class_balance",
    "baseline": "week2_baselines",
    "finetune_table": "week3_head_vs_full",
    "augment_ablation": "week3_augment_ablation",
    "ssl_pretrain": "week4_ssl_pretraining",
    "linear_probe": "week5_label_efficiency",
    "ssl_finetune": "week6_probe_vs_finetune",
    "calibrate": "week6_calibration",
    "thresholds": "week7_thresholds",
    "robustness": "week8_robustness",
}


def add_not_run(built: list[Table], not_run: Mapping[str, tuple[str, str]]) -> None:
    """Mark steps a study skipped (step → (stage, reason); e.g. a baseline without ImageNet weights)
    under the table of their stage, with the reason and what to do about it."""
    by_name = {t.name: t for t in built}
    for step, (stage, reason) in not_run.items():
        by_name[STEP_TABLES[stage]].not_run.append(f"study step `{step}`: {reason}")
