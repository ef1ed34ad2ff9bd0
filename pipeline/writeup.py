"""The draft's sentences, read from the tables and the runs they cite: the methods paragraph (from
the logged configs), the findings (from the paired intervals alone) and the reproducibility
checklist (code versions, commits, seeds, the command of each top-level run).
"""

from __future__ import annotations

import shutil
from collections import Counter
from itertools import groupby
from pathlib import Path
from typing import Any, Mapping

from medmnist.info import INFO

from pipeline import tracking
from pipeline.augment import SSL_VIEW_DESCRIPTION
from pipeline.render import PAIRED_METRICS, Table, interval_text, plural, seed_list
from pipeline.records import RunRecord


def environment_lines() -> list[str]:
    """The versions `compare` ran with (the cited runs' own code and commits are listed apart)."""
    import platform

    import torch

    return [
        f"compare ran with Python {platform.python_version()} on {platform.platform()}, torch {torch.__version__}, "
        f"mlflow {tracking.MLFLOW_VERSION}, code version {tracking.code_version()}"
    ]


def cited_run_ids(built: list[Table]) -> list[str]:
    """Every run id the tables cite (result runs, grid parents, analysed sources), in table order."""
    ids: list[str] = []
    for table in built:
        for record in table.records:
            ids += [str(record[k]) for k in ("run_id", "parent_run_id", "source_run_id") if record.get(k)]
            ids += str(record.get("run_ids", "")).split()
    return list(dict.fromkeys(ids))


def run_command(run: RunRecord) -> str:
    """The command that started a top-level run: `mlflow run` rebuilt from its `-P` params, else
    the command line it recorded."""
    tags = run.tags
    if entry := tags.get("mlflow.project.entryPoint"):
        params = " ".join(f"-P {k}={v}" for k, v in sorted(run.params.items()) if v not in ("", "''"))
        return f"mlflow run . -e {entry} {params} --env-manager local --experiment-name {tracking.experiment_name(run)}"
    return tags.get("command", f"(not recorded: a {tags.get('stage', '?')} run from before commands were tagged)")


def counted(values: list[str]) -> str:
    """`a (3 runs), b (1 run)` for the distinct values of a list, most common first."""
    return ", ".join(f"{v} ({plural(n, 'run')})" for v, n in Counter(values).most_common())


def root_of(run: RunRecord, known: Mapping[str, RunRecord]) -> RunRecord:
    """The top-level run a run is nested in (itself when it stands alone; the highest ancestor still
    in the store when one was purged)."""
    while (parent := run.tags.get("mlflow.parentRunId")) in known:
        run = known[parent]
    return run


def checklist_lines(built: list[Table]) -> tuple[list[str], list[str]]:
    """Checklist bullets (code versions, git commits, seeds of the cited runs) and the command of
    each top-level run they came from (a `study` run, or each step run on its own)."""
    cited = cited_run_ids(built)
    known = tracking.runs_by_id(cited)
    runs = [known[i] for i in cited if i in known]
    if not runs:
        return ["No run is cited: every table is missing."], []
    gone = [i for i in cited if i not in known]
    pending = {r.tags.get("mlflow.parentRunId") for r in runs} - set(known) - {None}
    while pending:  # ancestors, one search per nesting level
        found = tracking.runs_by_id(pending)
        known.update(found)
        pending = {r.tags.get("mlflow.parentRunId") for r in found.values()} - set(known) - {None}
    tags = [run.tags for run in runs]
    roots = {root.id: root for root in (root_of(run, known) for run in runs)}
    seeds = {seed for t in tags for seed in t.get("seed", "-").split(",") if seed not in ("-", "")}
    lines = [
        f"Runs cited by the tables: {len(runs)}, from {plural(len(roots), 'top-level run')}.",
        f"Code version (hash of pipeline/, configs/ and mlruns_template/): {counted([t.get('code_version', 'unknown') for t in tags])}.",
        f"Git commit: {counted([t.get('mlflow.source.git.commit', 'not recorded')[:12] for t in tags])}.",
        f"Seeds: {seed_list({'seed': s} for s in seeds) or 'none'}; label subsets are stratified and seeded.",
        *([f"Cited runs no longer in the store (purged): {', '.join(i[:8] for i in gone)}."] if gone else []),
    ]
    commands = [f"{run_command(root)}   # run {run_id[:8]}" for run_id, root in sorted(roots.items(), key=lambda kv: kv[1].start)]
    return lines, commands


def moco_text(record: Mapping[str, Any]) -> str:
    """MoCo's queue and batch-norm splits for the methods text (empty for SimCLR)."""
    if record["method"] != "moco":
        return ""
    splits = int(record["bn_splits"])
    norm = f"shuffling BN over {splits} chunks" if splits > 1 else "plain BN"
    return f", queue {record['queue_size']}, {norm}"


def listed(value: str) -> str:
    """A logged list param (`0,1,2`) as prose (`0, 1, 2`)."""
    return ", ".join(v for v in str(value).split(",") if v)


def seeds_text(value: str) -> str:
    """`seed 0` or `seeds 0, 1, 2` from a logged seeds param."""
    return f"seed{'s' if ',' in str(value) else ''} {listed(value)}"


def methods_text(dataset: str, built: list[Table]) -> str:
    """A methods paragraph filled in from the logged configurations: models, epochs, augmentations,
    SSL settings, label fractions and seeds of the runs the tables cite."""
    by_name = {t.name: t for t in built}
    parts = [f"We study the binary MedMNIST2D dataset `{dataset}` with its official train/validation/test split."]
    base = by_name.get("week2_baselines")
    if base and base.records:
        recipes = {r["recipe"]: r for r in base.records}
        models = [
            f"{r['model']} ({r['finetune']}{', ImageNet weights' if r['weights'] == 'imagenet' else ''}, "
            f"{plural(r['epochs'], 'epoch')}, lr {r['lr']}, batch {r['batch_size']}, augmentation {r['augment']}, "
            f"{seeds_text(seed_list((x for x in base.records if x['recipe'] == recipe), ','))}; recipe {recipe})"
            for recipe, r in sorted(recipes.items(), key=lambda kv: (kv[1]["model"], kv[0]))
        ]
        parts.append(f"Supervised baselines: {', '.join(models)}; the checkpoint with the best validation AUROC is evaluated once on test.")
    ablation = by_name.get("week3_augment_ablation")
    if ablation and ablation.records:
        a = ablation.settings
        parts.append(
            f"Augmentation ablation: {a['model']} trained for {plural(a['epochs'], 'epoch')} with each preset of "
            f"{listed(a['variants'])} (`none` is the control), {seeds_text(a['seeds'])}."
        )
    ssl = by_name.get("week4_ssl_pretraining")
    if ssl and ssl.records:
        runs = sorted(
            {
                f"{r['method']} ({r['model']}, τ={r['temperature']}, batch {r['batch_size']}{moco_text(r)}, {plural(r['steps'], 'optimizer step')}, seed {r['seed']})"
                for r in ssl.records
            }
        )
        parts.append(f"Self-supervised pretraining: {', '.join(runs)}; each view: {SSL_VIEW_DESCRIPTION}.")
    eff = by_name.get("week5_label_efficiency")
    if eff and eff.records:
        e = eff.settings
        fractions = sorted({r["label_fraction"] for r in eff.records})
        supervised = (
            f" and supervised-only models (the encoder's architecture from scratch, {budget_text(e, 'supervised_')}, augmentation {e['supervised_augment']})"
            if "supervised_augment" in e
            else ""
        )
        parts.append(
            "Label efficiency: linear probes (L2 logistic regression on frozen, standardised features, C chosen "
            f"on validation AUROC from {listed(e['probe_cs'])}){supervised} at "
            f"{', '.join(f'{f:.0%}' for f in fractions)} of the training labels "
            f"(stratified subsets, {seeds_text(e['seeds'])}; pretraining runs per SSL method: {e.get('pretraining_runs', '1')}, "
            "subset seed i using pretraining run i mod their number). Controls: a linear probe on the randomly "
            "initialised encoder (batch-norm statistics recomputed on the training images) and the majority class."
        )
    week6 = by_name.get("week6_probe_vs_finetune")
    if week6 and week6.records and week6.settings:
        f = week6.settings
        scales = listed(f["encoder_lr_scale"])
        scale = (
            f"encoder lr × {scales}"
            if "," not in f["encoder_lr_scale"]
            else f"encoder lr × one of {scales}, chosen per label fraction on the first seed's validation AUROC"
        )
        parts.append(
            f"SSL fine-tuning: the pretrained encoder with a new linear head, {budget_text(f)}, "
            f"head lr {f['lr']}, {scale}, augmentation {f['augment']}, {seeds_text(f['seeds'])}."
        )
    return " ".join(parts + posthoc_text(by_name))


def budget_text(settings: Mapping[str, str], prefix: str = "") -> str:
    """`300 optimizer steps at every label fraction`, or `20 epochs` where epochs replaced the step budget."""
    epochs = settings.get(f"{prefix}epochs", "")
    if epochs not in ("", "0") or not settings.get(f"{prefix}steps"):
        return plural(epochs or "?", "epoch")
    return f"{settings[prefix + 'steps']} optimizer steps at every label fraction"


CALIBRATOR_NAMES = {"temperature": "temperature scaling", "platt": "Platt scaling", "isotonic": "isotonic regression"}


def posthoc_text(by_name: Mapping[str, Table]) -> list[str]:
    """Methods sentences for the calibration, threshold and robustness analyses that have a run."""
    parts = []
    cal, thr, rob = (by_name.get(n) for n in ("week6_calibration", "week7_thresholds", "week8_robustness"))
    if cal and cal.records:
        methods = ", ".join(CALIBRATOR_NAMES.get(m, m) for m in listed(cal.settings.get("methods", "")).split(", "))
        parts.append(
            f"Calibration of classifier run {cal.settings['source_run_id'][:8]}: {methods} "
            f"fitted on the validation predictions and applied to test; ECE over {cal.settings.get('ece_bins')} "
            "equal-width bins of the top-label confidence."
        )
    if thr and thr.records:
        positive = thr.settings.get("positive_class", "1")  # runs logged before the setting took label 1
        parts.append(
            f"Decision thresholds for run {thr.settings['source_run_id'][:8]} (positive class: label {positive}, "
            f"{INFO[thr.settings['dataset']]['label'][positive]}; TPR and FPR refer to it): default 0.5, Youden's J, max F1, "
            f"target TPR {listed(thr.settings.get('target_tprs', ''))} and target FPR "
            f"{listed(thr.settings.get('target_fprs', ''))}, each chosen on validation and applied unchanged to test "
            f"(bootstrap 95% CIs, {thr.settings.get('bootstrap')} resamples)."
        )
    if rob and rob.records:
        parts.append(
            f"Robustness of run {rob.settings['source_run_id'][:8]}: test images under "
            f"{listed(rob.settings.get('corruptions', ''))} at severities {listed(rob.settings.get('severities', ''))}; "
            f"MC dropout with {rob.settings.get('mc_passes')} passes."
        )
    return parts


def findings_lines(built: list[Table]) -> list[str]:
    """The study's answer in words, read from the paired-difference intervals alone: one line per
    comparison and label fraction, and a warning when fewer than five seeds make the intervals wide."""
    table = next((t for t in built if t.name == "week6_paired_differences"), None)
    if table is None or not table.records:
        return ["No paired comparison yet: run linear_probe (and ssl_finetune) with at least two seeds."]
    lines = []
    for (comparison, fraction), group in groupby(table.records, key=lambda r: (r["comparison"], r["label_fraction"])):
        cells = {r["metric"]: r for r in group}
        said = "; ".join(f"{m.removeprefix('test_')} {interval_text(cells[m])}: {cells[m]['verdict']}" for m in PAIRED_METRICS if m in cells)
        lines.append(f"{comparison}, {fraction:.0%} of the labels (n = {min(r['n'] for r in cells.values())}): {said}.")
    fewest = min(r["n"] for r in table.records)
    if fewest < 5:
        lines.append(
            f"Only {fewest} paired seed(s) in some cells: intervals that wide cannot show small effects; "
            "these numbers are a wiring check, not evidence (use the paper profile, ≥ 5 seeds)."
        )
    return lines


PROMPT = "YOUR WORDS"


def prompt(question: str) -> str:
    """A clearly marked place for the student's own words (Markdown)."""
    return f"> ✍ **{PROMPT}:** {question}\n"


def fetch(run_id: str, artifact: str, target: Path) -> bool:
    """Copy one artifact of a run to `target`; False when the run does not hold it."""
    if not tracking.has_artifacts(run_id, (artifact,)):
        return False
    shutil.copy2(tracking.download_artifact(run_id, artifact), target)
    return True


def dataset_text(dataset: str) -> str:
    """The dataset in one sentence: task, classes, split sizes (MedMNIST's own description)."""
    info = INFO[dataset]
    labels = ", ".join(f"{k} = {v}" for k, v in info["label"].items())
    sizes = ", ".join(f"{n} {split}" for split, n in info["n_samples"].items())
    return f"{info['python_class']} ({info['task']}; labels {labels}; official splits {sizes} images)."
