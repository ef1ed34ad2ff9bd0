"""The weekly hand-ins: `results/week1` … `results/week10` `/<dataset>/<name>/`, each with the study
plan's file names, the figures and tables of that week's runs, and a `README_weekN.md` that fills in
the measured numbers and leaves the plan's questions as marked prompts for the student's own words.
Written from compare's tables (the runs they cite) and never over an earlier export.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.gallery import STUDENT_COLUMNS
from pipeline.render import Table, best_on_validation, fmt, markdown, validation_auroc
from pipeline.writeup import dataset_text, fetch, prompt

WEEKS = range(1, 11)
EXPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WEEK_OF_TABLE = {
    "week1_class_balance": 1,
    "week2_baselines": 2,
    "week3_augment_ablation": 3,
    "week3_head_vs_full": 3,
    "week4_ssl_pretraining": 4,
    "week5_label_efficiency": 5,
    "week6_probe_vs_finetune": 6,
    "week6_paired_differences": 6,
    "week6_calibration": 6,
    "week6_calibration_change": 6,
    "week7_thresholds": 7,
    "week8_robustness": 8,
}


@dataclass
class Folder:
    """One week's hand-in while it is assembled in a staging folder: its files and README parts."""

    week: int
    title: str
    root: Path
    files: list[str] = field(default_factory=list)
    readme: list[str] = field(default_factory=list)

    def add_artifact(self, run_id: str, artifact: str, target: str, what: str) -> bool:
        """Copy a run's artifact under the plan's file name; False when the run does not hold it."""
        if fetch(run_id, artifact, self.root / target):
            self.files.append(f"`{target}`: {what} (run {run_id[:8]})")
            return True
        return False

    def add_file(self, source: Path, target: str, what: str) -> None:
        """Copy a local file (a table compare wrote, the draft) under `target`."""
        (self.root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, self.root / target)
        self.files.append(f"`{target}`: {what}")

    def add_text(self, target: str, text: str, what: str) -> None:
        """Write a text file of this week."""
        (self.root / target).write_text(text)
        self.files.append(f"`{target}`: {what}")

    def add_table(self, table: Table, written: Mapping[str, list[Path]]) -> None:
        """A compare table's files (md, csv, tex, png), its records as JSON, and the table in the README."""
        for source in written.get(table.name, []):
            shutil.copy2(source, self.root / source.name)
        (self.root / f"{table.name}_metrics.json").write_text(json.dumps(json_safe(table.records), indent=2, default=str))
        self.files.append(f"`{table.name}.md|csv|tex`, `{table.name}_metrics.json`: the table above")
        self.readme.append(markdown(table, level=3, not_run=False))  # the README lists what did not run itself

    def text(self, dataset: str, name: str, not_run: list[str]) -> str:
        """The week's README: title, numbers and prompts, the files, and what did not run."""
        skipped = ["## Not run\n", *[f"- {line}" for line in not_run], ""] if not_run else []
        files = ["## Files\n", *[f"- {line}" for line in self.files], ""]
        return "\n".join([f"# Week {self.week} — {self.title}: {dataset} ({name})\n", *self.readme, "", *files, *skipped])


def json_safe(value: Any) -> Any:
    """Records with NaN and infinities as null, so the metrics JSON is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def check_name(name: str) -> None:
    """An export name is a plain folder name, so it stays inside results/weekN/<dataset>/."""
    if not EXPORT_NAME.fullmatch(name):
        raise UserError(
            f"--export-results {name!r} must be a plain name (letters, digits, '.', '_', '-'; no '/' or '..'), e.g. alice-v1: it becomes results/weekN/<dataset>/<name>/"
        )


def targets(results_root: Path, name: str, dataset: str) -> dict[int, Path]:
    """`results/weekN/<dataset>/<name>/` for every week."""
    return {week: results_root / f"week{week}" / dataset / name for week in WEEKS}


def check_export_is_new(results_root: Path, name: str, dataset: str) -> None:
    """Refuse a name already used: an export never replaces an earlier one (it may hold the student's edits)."""
    check_name(name)
    taken = [str(p) for p in targets(results_root, name, dataset).values() if p.exists()]
    if taken:
        raise UserError(f"results export {name!r} already exists ({taken[0]}); choose another --export-results name or remove those folders")


def environment_report() -> str:
    """Python, torch, CUDA/device, CPU and library versions of this machine, as Markdown."""
    import matplotlib
    import medmnist
    import numpy
    import sklearn
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    device = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if cuda else "no CUDA GPU visible: CPU"
    rows = [
        ("Python", platform.python_version()),
        ("Platform", platform.platform()),
        ("CPU", f"{platform.machine()}, {os.cpu_count()} logical cores, {cpu_model()}"),
        ("Device", device),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("medmnist", medmnist.__version__),
        ("mlflow", tracking.MLFLOW_VERSION),
        ("numpy", numpy.__version__),
        ("scikit-learn", sklearn.__version__),
        ("matplotlib", matplotlib.__version__),
        ("code version", tracking.code_version()),
    ]
    lines = [
        "# Environment",
        "",
        "Read off the machine that ran `compare`; the machine that trained each run is in its `host` "
        "tag (a study may reuse runs trained elsewhere). It stands in for the plan's `screenshot_env.png`.",
        "",
        "| item | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    return "\n".join(lines) + "\n"


def cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown model"


def with_student_columns(text: str) -> str:
    """An error CSV with empty `hypothesis` and `possible_fix` columns added where it lacks them."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        return text
    columns = [*rows[0], *(c for c in STUDENT_COLUMNS if c not in rows[0])]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r.get(c) or "" for c in columns} for r in rows)
    return out.getvalue()


def add_error_csv(folder: Folder, run_id: str, artifact: str, target: str, what: str) -> None:
    """An error table with the student's columns (hypothesis, possible fix) to fill in."""
    if folder.add_artifact(run_id, artifact, target, what):
        path = folder.root / target
        path.write_text(with_student_columns(path.read_text()))


def add_week_table(folder: Folder, ctx: Context, name: str) -> Table | None:
    """Add one of compare's tables to a week (its files, its rows in the README) and return it, or
    say in the README why it is empty and return None."""
    table = ctx["tables"][name]
    if table.records:
        folder.add_table(table, ctx["written"])
        return table
    folder.readme.append(markdown(table, level=3, not_run=False))  # its title and compare's note with the command to run
    return None


def analysed_runs(table: Table | None) -> list[tuple[str, str]]:
    """(file suffix, run id) of each post-hoc run a table cites: no suffix for the baseline's,
    `_<kind>` for another analysed model's (e.g. `_ssl_finetune`)."""
    runs = dict.fromkeys((r["analysed_kind"], r["run_id"]) for r in table.records) if table is not None else {}
    return [("" if kind == "baseline" else f"_{kind}", run_id) for kind, run_id in runs]


Context = dict[str, Any]  # dataset, tables by name, the files compare wrote for them, compare's output folder


def week1(folder: Folder, ctx: Context) -> None:
    """Data exploration and the environment report."""
    folder.add_text("environment.md", environment_report(), "Python, torch, device, CPU and library versions")
    folder.readme += ["## Dataset recap\n", dataset_text(ctx["dataset"]), ""]
    table = add_week_table(folder, ctx, "week1_class_balance")
    if table is not None:
        run_id = table.records[0]["run_id"]
        for artifact, target, what in (
            ("eda/summary.json", "eda_summary.json", "pixel statistics, class balance, duplicates"),
            ("eda/samples_per_class.png", "samples_per_class.png", "seeded train images per class"),
            ("eda/intensity_histograms.png", "intensity_histograms.png", "pixel intensities per class"),
            ("eda/duplicate_examples.png", "duplicate_examples.png", "example exact duplicates"),
        ):
            folder.add_artifact(run_id, artifact, target, what)
    folder.readme += [
        "The environment report (`environment.md`) replaces the plan's `screenshot_env.png`.\n",
        prompt("What do the two classes look like in `samples_per_class.png`? What could make them hard to tell apart?"),
        prompt("Does any split differ from the others (class balance, intensities, duplicates)? What could that do to the metrics?"),
    ]


def week2(folder: Folder, ctx: Context) -> None:
    """Supervised baselines: per model its metrics, confusion matrix, reliability diagram and
    learning curves; the best baseline's error gallery."""
    folder.readme += ["## Dataset recap\n", dataset_text(ctx["dataset"]), ""]
    folder.readme.append("## Baseline comparison\n")
    table = add_week_table(folder, ctx, "week2_baselines")
    if table is None:
        return
    by_key: dict[str, list[dict[str, Any]]] = {}
    for record in table.records:
        by_key.setdefault(record["key"], []).append(record)
    snapshot = []
    for key, records in by_key.items():
        best = best_on_validation(records)
        run_id = best["run_id"]
        folder.add_artifact(run_id, "test_metrics.json", f"metrics_{key}.json", f"test metrics of {key}")
        folder.add_artifact(run_id, "plots/confusion_matrix.png", f"cm_{key}.png", f"confusion matrix of {key} (test)")
        folder.add_artifact(run_id, "plots/reliability.png", f"reliability_{key}.png", f"reliability diagram of {key} (test, top label)")
        folder.add_artifact(run_id, "plots/reliability_class1.png", f"reliability_class1_{key}.png", f"reliability of p(class 1) of {key} (test, equal-width bins)")
        folder.add_artifact(
            run_id, "plots/reliability_class1_eqfreq.png", f"reliability_class1_eqfreq_{key}.png", f"reliability of p(class 1) of {key} (test, equal-count bins)"
        )
        folder.add_artifact(run_id, "plots/learning_curves.png", f"learning_curves_{key}.png", f"learning curves of {key}")
        snapshot.append(f"| {key} | {run_id[:8]} | {fmt(best.get('val_auroc'))} | {fmt(best['test_auroc'])} | {fmt(best['test_acc'])} | {fmt(best['test_ece'])} |")
    folder.readme += [
        "Per model, the run with the best validation AUROC (its files are `metrics_<model>.json`, `cm_<model>.png`, "
        "`reliability_<model>.png`, `learning_curves_<model>.png`):\n",
        "| model | run | val AUROC | test AUROC | test acc | test ECE |",
        "|---|---|---|---|---|---|",
        *snapshot,
        "",
        prompt("Which baseline is best, and is the difference larger than the spread between seeds?"),
        "## Calibration snapshot\n",
        "Test ECE per model is in the table above; the reliability diagrams are `reliability_<model>.png`.\n",
        prompt("Which model is over- or under-confident, and where on the confidence axis?"),
    ]
    best = best_on_validation(table.records)
    chosen = (
        "the baseline with the best validation AUROC (chosen without looking at test)"
        if math.isfinite(validation_auroc(best))
        else "the newest baseline (none has a validation AUROC)"
    )
    folder.readme.append("## Error analysis\n")
    if not folder.add_artifact(best["run_id"], "gallery/misclassified_gallery.png", "misclassified_gallery.png", "the most confident test mistakes of the best baseline"):
        folder.readme.append(f"_Run {best['run_id'][:8]} ({chosen}) logged no error gallery: `mlflow run . -e eda -P run_id={best['run_id']}` makes one._\n")
        return
    add_error_csv(
        folder, best["run_id"], "gallery/misclassified_gallery.csv", "misclassified_gallery.csv", "those mistakes, with `hypothesis` and `possible_fix` columns for you"
    )
    folder.readme += [
        f"The gallery shows the most confident test mistakes of run {best['run_id'][:8]} ({best['key']}), {chosen}.\n",
        prompt("For each image in `misclassified_gallery.png`, write a hypothesis and a possible fix in `misclassified_gallery.csv`; summarise the pattern here."),
    ]


def week3(folder: Folder, ctx: Context) -> None:
    """Augmentation ablation and head-only vs. full fine-tuning."""
    folder.readme.append("## Augmentation ablation\n")
    add_week_table(folder, ctx, "week3_augment_ablation")
    folder.readme += [
        prompt("Which augmentation helps, judged by the spread over seeds? Why might flips or crops suit (or not suit) these images?"),
        "## Head-only vs. full fine-tuning\n",
    ]
    table = add_week_table(folder, ctx, "week3_head_vs_full")
    if table is None:
        return
    folder.add_artifact(table.records[0]["parent_run_id"], "plots/finetune_losses.png", "head_vs_full_losses.png", "train and validation losses per epoch of both")
    folder.readme.append(prompt("What does training only the head cost or save, in AUROC and in time? Do both start from the same weights?"))


def week4(folder: Folder, ctx: Context) -> None:
    """SSL pretraining: the summary, and per run its loss/kNN curve and config."""
    table = add_week_table(folder, ctx, "week4_ssl_pretraining")
    if table is None:
        return
    for record in table.records:
        tag = f"{record['method']}_s{record['seed']}"
        folder.add_artifact(record["run_id"], "plots/ssl_loss.png", f"ssl_loss_{tag}.png", "contrastive loss and kNN AUROC against steps")
        folder.add_artifact(record["run_id"], "ssl_config.json", f"ssl_config_{tag}.json", "its pretraining settings")
    folder.readme += [
        "The kNN validation AUROC at step 0 is the randomly initialised encoder: the gain is the difference.\n",
        prompt("Did the loss and the kNN monitor level off within the budget? How do SimCLR and MoCo differ?"),
    ]


def week5(folder: Folder, ctx: Context) -> None:
    """Linear probes at 1/5/10% of the labels with the controls, accuracy and AUROC vs. fraction."""
    table = add_week_table(folder, ctx, "week5_label_efficiency")
    if table is None:
        return
    for source, target, what in (
        ("figures/week5_label_efficiency.png", "auroc_vs_fraction.png", "test AUROC against the label fraction"),
        ("figures/label_efficiency_acc.png", "acc_vs_fraction.png", "test accuracy against the label fraction"),
    ):
        if (ctx["out_dir"] / source).is_file():
            folder.add_file(ctx["out_dir"] / source, target, what)
    folder.readme += [
        "The random-encoder probe and the majority class are controls: an SSL probe must beat both to count.\n",
        prompt("At which fraction does the SSL probe pull ahead of supervised-only, if any? Use week 6's paired intervals."),
    ]


def week6(folder: Folder, ctx: Context) -> None:
    """Fine-tuning vs. probe vs. supervised, the paired differences, calibration before/after."""
    for name in ("week6_probe_vs_finetune", "week6_paired_differences", "week6_calibration", "week6_calibration_change"):
        add_week_table(folder, ctx, name)
    for suffix, run_id in analysed_runs(ctx["tables"].get("week6_calibration")):
        for file in ("reliability_before", "reliability_after", "reliability_side_by_side"):
            folder.add_artifact(run_id, f"plots/{file}.png", f"{file}{suffix}.png", "reliability diagram (test)")
    folder.readme += [
        prompt("Does fine-tuning beat the probe, and at which fractions? Quote the intervals, not the means."),
        prompt("Does temperature scaling improve test calibration beyond the bootstrap interval?"),
    ]


def week7(folder: Folder, ctx: Context) -> None:
    """Decision thresholds: the table, ROC and PR with the operating points, high-confidence errors."""
    table = add_week_table(folder, ctx, "week7_thresholds")
    if table is None:
        return
    for suffix, run_id in analysed_runs(table):
        folder.add_artifact(run_id, "plots/roc.png", f"roc{suffix}.png", "ROC curve with the operating points (test)")
        folder.add_artifact(run_id, "plots/pr.png", f"pr{suffix}.png", "precision-recall curve with the operating points (test)")
        folder.add_artifact(run_id, "plots/high_confidence_errors.png", f"high_confidence_errors{suffix}.png", "the most confident test errors")
        add_error_csv(
            folder,
            run_id,
            "thresholds/high_confidence_errors.csv",
            f"high_confidence_errors{suffix}.csv",
            "those errors, with `note`, `hypothesis` and `possible_fix` for you",
        )
    folder.readme += [
        prompt("Which operating point would you recommend for screening, and what does it cost in false alarms?"),
        prompt("Fill in `high_confidence_errors.csv`: what do the confident errors have in common?"),
    ]


def week8(folder: Folder, ctx: Context) -> None:
    """Robustness, MC dropout and the one-page ethics and limits note."""
    table = add_week_table(folder, ctx, "week8_robustness")
    if table is None:
        return
    run_id = table.records[0]["run_id"]
    for file, what in (
        ("robustness", "AUROC, accuracy and ECE against severity"),
        ("mc_dropout_entropy", "MC-dropout predictive entropy"),
        ("corruption_examples", "one test image under each corruption"),
    ):
        folder.add_artifact(run_id, f"plots/{file}.png", f"{file}.png", what)
    folder.readme.append("## Ethics and limits note (1 page)\n")
    if folder.add_artifact(run_id, "robustness/week8_note.md", "ethics_limits_note.md", "the one-page ethics and limits note to complete"):
        folder.readme.append("Complete `ethics_limits_note.md`; it starts from the measured numbers.\n")
    folder.readme += [
        prompt("Who could be harmed by a wrong prediction here, and how would a deployment catch it?"),
        prompt("What shift (scanner, site, population) would this model not survive, judging by the robustness table?"),
    ]


def week9(folder: Folder, ctx: Context) -> None:
    """The paper draft (Markdown, LaTeX, PDF when built) with all its figures."""
    out_dir: Path = ctx["out_dir"]
    for name, what in (("draft.md", "the draft in Markdown"), ("draft.tex", "the draft in LaTeX"), ("draft.pdf", "the draft as PDF")):
        if (out_dir / name).is_file():
            folder.add_file(out_dir / name, name, what)
    for figure in sorted((out_dir / "figures").glob("*.png")):
        folder.add_file(figure, f"figures/{figure.name}", "a figure of the draft")
    pdf = "" if (out_dir / "draft.pdf").is_file() else " (`draft.pdf` was not built here: install a LaTeX engine, then run `latexmk -pdf draft.tex`)"
    folder.readme += [
        f"The draft has Introduction, Methods, Experiments, Results, Discussion, Limitations and a reproducibility "
        f"checklist, filled in from the runs{pdf}. Each `YOUR WORDS` box is yours to write.\n",
        prompt("Write the abstract (4–5 sentences): question, data, what you found, with the intervals."),
    ]


def week10(folder: Folder, ctx: Context) -> None:
    """The talk: Beamer slides (PDF when built) and speaker notes."""
    out_dir: Path = ctx["out_dir"]
    for name, what in (("slides.tex", "the talk in Beamer"), ("slides.pdf", "the talk as PDF"), ("speaker_notes.md", "what to say on each slide")):
        if (out_dir / name).is_file():
            folder.add_file(out_dir / name, name, what)
    for figure in sorted((out_dir / "figures").glob("*.png")):
        folder.add_file(figure, f"figures/{figure.name}", "a figure of the slides")
    folder.readme += [
        "A 10–12 minute talk: question, data, methods, key figures, verdicts, limitations. Rebuild after editing with `latexmk -pdf slides.tex`.\n",
        prompt("Rehearse once with a timer: which slide ran long, and what did you cut?"),
    ]


WEEK_BUILDERS: dict[int, tuple[str, Callable[[Folder, Context], None]]] = {
    1: ("data exploration and environment", week1),
    2: ("supervised baselines", week2),
    3: ("augmentation ablation and fine-tuning depth", week3),
    4: ("self-supervised pretraining", week4),
    5: ("linear probes and label efficiency", week5),
    6: ("fine-tuning, paired differences and calibration", week6),
    7: ("decision thresholds", week7),
    8: ("robustness and the ethics note", week8),
    9: ("the paper", week9),
    10: ("the talk", week10),
}


def not_run_by_week(built: list[Table]) -> dict[int, list[str]]:
    """What was asked for but did not run, with the reason (the tables carry it), by week."""
    found: dict[int, list[str]] = {week: [] for week in WEEKS}
    for table in built:
        if table.name in WEEK_OF_TABLE:
            found[WEEK_OF_TABLE[table.name]] += table.not_run
    return found


def export_results(built: list[Table], written: Mapping[str, list[Path]], out_dir: Path, results_root: Path, name: str, dataset: str) -> list[Path]:
    """Write every week's hand-in folder (the caller has checked the name with `check_export_is_new`);
    each is assembled in a staging folder and renamed into place, so an interrupted export leaves
    whole weeks only."""
    ctx: Context = {"dataset": dataset, "tables": {t.name: t for t in built}, "written": written, "out_dir": out_dir}
    skipped = not_run_by_week(built)
    done = []
    for week, target in targets(results_root, name, dataset).items():
        title, build = WEEK_BUILDERS[week]
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.") as staging:
            folder = Folder(week, title, Path(staging) / name)
            folder.root.mkdir()
            build(folder, ctx)
            (folder.root / f"README_week{week}.md").write_text(folder.text(dataset, name, skipped[week]))
            os.replace(folder.root, target)
        done.append(target)
    return done
