"""Weeks 9–10: the paper draft (Markdown and LaTeX, built to PDF when a LaTeX engine is installed)
and the talk (Beamer slides with speaker notes), scaffolded from compare's tables and the cited
runs' figures. Numbers and verdicts are filled in; what only the student can say is a marked prompt.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt

from pipeline import tables
from pipeline.render import Table, best_on_validation, fmt, interval_text, markdown, write_atomic
from pipeline.results import label_efficiency_figure
from pipeline.writeup import PROMPT, checklist_lines, dataset_text, environment_lines, fetch, findings_lines, methods_text, prompt

QUESTION = (
    "Question: does contrastive self-supervised pretraining (SimCLR-lite, MoCo-lite) on the unlabeled training images "
    "help a classifier when only 1%, 5% or 10% of the labels are available, and how well calibrated are the resulting models?"
)
INTRO_PROMPT = "Why does this question matter clinically for this dataset? What did you expect, and why?"
DISCUSSION_PROMPT = (
    "When does SSL help on this dataset, and when not? Why might that be (dataset size, image content, budget)? "
    "What do the calibration and threshold results mean for a screening use?"
)
LIMITATIONS_PROMPT = "What else limits these conclusions (label noise, duplicates, shift between sites)? What would you run next?"
VERDICT_NOTE = "Each verdict is read from its 95% interval, not from which mean is larger:"
LATEX_ENGINES = (
    ("latexmk", ["latexmk", "-norc", "-pdf", "-interaction=nonstopmode", "-halt-on-error"]),
    ("pdflatex", ["pdflatex", "-interaction=nonstopmode", "-halt-on-error"]),
    ("tectonic", ["tectonic", "--keep-logs"]),
)
LATEX_SECONDS = 180  # per engine call; a stuck engine (and its children) is killed, compare goes on
BUILD_LEFTOVERS = (".aux", ".log", ".fls", ".fdb_latexmk", ".nav", ".snm", ".toc", ".out", ".vrb")  # kept only when a build fails
INSTALL_LATEX = (
    "no LaTeX engine found (latexmk, pdflatex or tectonic): install one to build the PDFs, e.g. "
    "`sudo apt install texlive-latex-recommended texlive-fonts-recommended texlive-pictures latexmk` (Debian/Ubuntu), "
    "MacTeX (macOS) or tectonic; the .tex files are written either way"
)


@dataclass
class PaperFigure:
    """One figure of the paper: its file under `figures/`, caption, and the week it belongs to."""

    name: str
    caption: str
    week: int


def by_name(built: list[Table]) -> dict[str, Table]:
    """The tables by name."""
    return {t.name: t for t in built}


def first_record(table: Table | None) -> dict[str, Any] | None:
    """A table's first record, or None when it has none."""
    return table.records[0] if table is not None and table.records else None


# (table, artifact of the run its first record cites, figure file, caption, week)
RUN_FIGURES = (
    ("week1_class_balance", "eda/samples_per_class.png", "samples_per_class.png", "Seeded training images per class", 1),
    ("week6_calibration", "plots/reliability_side_by_side.png", "reliability_before_after.png", "Reliability before and after temperature scaling (test)", 6),
    ("week7_thresholds", "plots/roc.png", "roc.png", "ROC curve on test with the validation-chosen operating points", 7),
    ("week7_thresholds", "plots/pr.png", "pr.png", "Precision-recall curve on test with the operating points", 7),
    ("week8_robustness", "plots/robustness.png", "robustness.png", "AUROC, accuracy and ECE under corruptions", 8),
)
TABLE_FIGURES = {
    "week3_augment_ablation": ("Augmentation ablation: test AUROC per variant", 3),
    "week5_label_efficiency": ("Label efficiency: test AUROC against the label fraction", 5),
    "week6_paired_differences": ("Paired differences with 95% intervals against the label fraction", 6),
}


def collect_figures(built: list[Table], out_dir: Path, dataset: str) -> list[PaperFigure]:
    """Every week-9 figure under `out_dir/figures/`: the tables' own figures, label-efficiency
    accuracy, the SSL loss/kNN curve of each method, and the runs' ROC/PR, reliability and
    robustness plots. A figure whose run is absent is left out (its table says why)."""
    folder = out_dir / "figures"
    shutil.rmtree(folder, ignore_errors=True)  # figures of an earlier compare must not outlive their tables
    folder.mkdir(parents=True)
    tables_by_name = by_name(built)
    found: list[PaperFigure] = []
    for name, (caption, week) in TABLE_FIGURES.items():
        source = out_dir / f"{name}.png"
        if source.is_file():
            shutil.copy2(source, folder / source.name)
            found.append(PaperFigure(source.name, caption, week))
    efficiency = tables_by_name.get("week5_label_efficiency")
    grid = [r for r in efficiency.records if r.get("n") and r["method"] != "majority_class"] if efficiency else []
    if grid:
        figure = label_efficiency_figure(grid, "test_acc", f"{dataset}: label efficiency (accuracy)")
        figure.savefig(folder / "label_efficiency_acc.png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        found.append(PaperFigure("label_efficiency_acc.png", "Label efficiency: test accuracy against the label fraction", 5))
    ssl = tables_by_name.get("week4_ssl_pretraining")
    for method, record in {r["method"]: r for r in reversed(ssl.records)}.items() if ssl else ():
        if fetch(record["run_id"], "plots/ssl_loss.png", folder / f"ssl_curves_{method}.png"):
            found.append(
                PaperFigure(f"ssl_curves_{method}.png", f"{method}: contrastive loss and kNN validation AUROC against optimizer steps (seed {record['seed']})", 4)
            )
    for table_name, artifact, file, caption, week in RUN_FIGURES:
        record = first_record(tables_by_name.get(table_name))
        if record and fetch(record["run_id"], artifact, folder / file):
            found.append(PaperFigure(file, f"{caption} (run {record['run_id'][:8]})", week))
    return sorted(found, key=lambda f: f.week)


def skipped_lines(built: list[Table]) -> list[str]:
    """Every step or method that was asked for but did not run, with its reason."""
    return [line for table in built for line in table.not_run]


def experiments_lines(built: list[Table]) -> list[str]:
    """What was compared, one line per experiment that has runs, from the tables' records."""
    t = by_name(built)
    lines = []
    if base := t.get("week2_baselines"):
        if base.records:
            kinds = sorted({r["key"] for r in base.records})
            fractions = sorted({float(r["label_fraction"]) for r in base.records})
            lines.append(f"Supervised baselines on {', '.join(f'{f:.0%}' for f in fractions)} of the labels: {', '.join(kinds)} ({len(base.records)} runs).")
    if (ablation := t.get("week3_augment_ablation")) and ablation.records:
        lines.append(f"Augmentation ablation: {', '.join(r['variant'] for r in ablation.records)}.")
    if (ssl := t.get("week4_ssl_pretraining")) and ssl.records:
        methods = sorted({r["method"] for r in ssl.records})
        lines.append(f"Contrastive pretraining: {', '.join(methods)} ({len(ssl.records)} pretraining runs).")
    if (eff := t.get("week5_label_efficiency")) and eff.records:
        fractions = sorted({r["label_fraction"] for r in eff.records})
        lines.append(f"Label efficiency at {', '.join(f'{f:.0%}' for f in fractions)} of the labels: {', '.join(dict.fromkeys(r['method'] for r in eff.records))}.")
    if (paired := t.get("week6_paired_differences")) and paired.records:
        lines.append(f"Paired comparisons (same label subset per seed): {', '.join(dict.fromkeys(r['comparison'] for r in paired.records))}.")
    for name, what in (("week6_calibration", "Calibration"), ("week7_thresholds", "Decision thresholds"), ("week8_robustness", "Robustness")):
        if (table := t.get(name)) and table.records:
            analysed = dict.fromkeys(f"{r.get('analysed', 'the')} classifier (run {r['source_run_id'][:8]})" for r in table.records)
            lines.append(f"{what} of the {' and the '.join(analysed)}.")
    return lines or ["No experiment has a finished run yet."]


def prevalence(table: Table | None, split: str) -> float | None:
    """The fraction of label 1 in a split, from the week-1 class-balance table."""
    rows = [r for r in table.records if r["split"] == split] if table is not None else []
    total = sum(int(r["count"]) for r in rows)
    return sum(int(r["count"]) for r in rows if str(r["label"]) == "1") / total if total else None


def limitations_lines(built: list[Table], dataset: str) -> list[str]:
    """Limitations the runs themselves show: one dataset, seeds, a prevalence shift between
    train and test, what was skipped."""
    t = by_name(built)
    lines = [f"One dataset ({dataset}); results may not transfer to other datasets or resolutions."]
    paired = t.get("week6_paired_differences")
    if paired and paired.records:
        counts = sorted({r["n"] for r in paired.records})
        seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        lines.append(f"The paired intervals rest on {seeds} seeds per cell; no correction for multiple comparisons is applied, so read single verdicts with care.")
    train, test = prevalence(t.get("week1_class_balance"), "train"), prevalence(t.get("week1_class_balance"), "test")
    if train is not None and test is not None and abs(train - test) > 0.05:
        lines.append(
            f"The test split's prevalence of label 1 ({test:.1%}) differs from training ({train:.1%}): accuracy, "
            "PPV and NPV at validation-chosen thresholds shift with it."
        )
    lines += [f"Not run: {line}" for line in skipped_lines(built)]
    return lines


def draft_markdown(dataset: str, built: list[Table], figures: list[PaperFigure]) -> str:
    """The write-up: introduction, methods, experiments, results with every table and figure,
    discussion from the paired intervals, limitations, reproducibility checklist."""
    lines, commands = checklist_lines(built)
    sections = [
        f"# {dataset}: when does self-supervised pretraining help? — draft\n",
        f"_Generated by `medmnist-ssl compare` from the tracked runs; every result below comes from a cited run. Replace each **{PROMPT}** prompt with your own text._\n",
        "## Introduction\n",
        f"Dataset: {dataset_text(dataset)}",
        QUESTION + "\n",
        prompt(INTRO_PROMPT),
        "## Methods\n",
        methods_text(dataset, built) + "\n",
        "## Experiments\n",
        *[f"- {line}" for line in experiments_lines(built)],
        "",
        "## Results\n",
    ]
    for table in built:
        sections.append(markdown(table, level=3))
    sections += [f"![{f.caption}](figures/{f.name})\n" for f in figures]
    sections += [
        "## Discussion\n",
        VERDICT_NOTE + "\n",
        *[f"- {line}" for line in findings_lines(built)],
        "",
        prompt(DISCUSSION_PROMPT),
        "## Limitations\n",
        *[f"- {line}" for line in limitations_lines(built, dataset)],
        "",
        prompt(LIMITATIONS_PROMPT),
        "## Reproducibility checklist\n",
        *[f"- {line}" for line in lines + environment_lines()],
        "- Test split: used once per run, with the checkpoint selected on validation.",
        "",
        "Commands (one per top-level run the tables cite, oldest first):",
        "```",
        *commands,
        "```",
        "",
    ]
    return "\n".join(sections)


def ascii_only(text: str) -> str:
    """Text for a listing: any non-ASCII character as `?` (an ASCII-only .tex compiles anywhere)."""
    return text.encode("ascii", "replace").decode("ascii")


def latex_prompt(question: str) -> str:
    """A marked prompt in the LaTeX draft, boxed so it cannot be missed."""
    return f"\\fbox{{\\parbox{{0.95\\linewidth}}{{\\textbf{{YOUR WORDS:}} {tables.latex_escape(question)}}}}}"


def latex_items(lines: list[str]) -> str:
    """A LaTeX itemize of plain-text lines."""
    return "\\begin{itemize}\n" + "\n".join(f"\\item {tables.latex_escape(line.replace('`', ''))}" for line in lines) + "\n\\end{itemize}"


def latex_figure(figure: PaperFigure, width: str = "0.7\\linewidth") -> str:
    """A floating figure from `figures/`."""
    return (
        "\\begin{figure}[tbp]\n\\centering\n"
        f"\\includegraphics[width={width}]{{figures/{figure.name}}}\n"
        f"\\caption{{{tables.latex_escape(figure.caption)}}}\n\\end{{figure}}"
    )


LATEX_PREAMBLE = (
    "\\documentclass[10pt]{article}\n\\usepackage[margin=2cm]{geometry}\n"
    "\\usepackage{booktabs}\n\\usepackage{graphicx}\n\\usepackage{listings}\n"
    "\\lstset{basicstyle=\\ttfamily\\small,breaklines=true,columns=fullflexible}\n"
)  # long commands wrap


def draft_latex(dataset: str, built: list[Table], figures: list[PaperFigure]) -> str:
    """The same write-up as a LaTeX article (booktabs tables, the figures), ASCII only."""
    escape = tables.latex_escape
    lines, commands = checklist_lines(built)
    body = [
        "\\section{Introduction}",
        f"Dataset: {escape(dataset_text(dataset))}",
        escape(QUESTION) + "\n",
        latex_prompt(INTRO_PROMPT),
        f"\\section{{Methods}}\n{escape(methods_text(dataset, built).replace('`', ''))}",
        "\\section{Experiments}",
        latex_items(experiments_lines(built)),
        "\\section{Results}",
    ]
    for table in built:
        body.append(tables.to_latex(table.rows, table.header, table.title) if table.rows else f"\\paragraph{{{escape(table.title)}.}} {escape(table.missing)}")
        body += [f"\\paragraph{{Not run.}} {escape(line.replace('`', ''))}" for line in table.not_run]
    body += [latex_figure(f) for f in figures]
    body += [
        "\\clearpage\\section{Discussion}",
        escape(VERDICT_NOTE),
        latex_items(findings_lines(built)),
        latex_prompt(DISCUSSION_PROMPT),
        "\\section{Limitations}",
        latex_items(limitations_lines(built, dataset)),
        latex_prompt(LIMITATIONS_PROMPT),
        "\\section{Reproducibility checklist}",
        latex_items([*lines, *environment_lines()]),
        "Commands (one per top-level run the tables cite, oldest first):",
        "\\begin{lstlisting}\n" + "\n".join(ascii_only(c) for c in commands) + "\n\\end{lstlisting}",
    ]
    return (
        LATEX_PREAMBLE + "\\begin{document}\n"
        f"\\title{{{escape(dataset)}: when does self-supervised pretraining help?}}\n\\author{{DRAFT}}\n\\maketitle\n" + "\n\n".join(body) + "\n\\end{document}\n"
    )


def slide(title: str, body: str, notes: str) -> tuple[str, str]:
    """One Beamer frame with its speaker notes (LaTeX), and the notes as Markdown."""
    escape = tables.latex_escape
    frame = f"\\begin{{frame}}{{{escape(title)}}}\n{body}\n\\note{{{escape(notes)}}}\n\\end{{frame}}"
    return frame, f"## {title}\n\n{notes}\n"


def figure_slide(figures: list[PaperFigure], title: str, *names: str, notes: str) -> tuple[str, str] | None:
    """A slide showing the named figures that exist (None when none does)."""
    shown = [f for f in figures if f.name in names]
    if not shown:
        return None
    width = f"{0.95 / len(shown):.2f}\\linewidth"
    body = "\\centering\n" + "\n".join(f"\\includegraphics[width={width},height=0.72\\textheight,keepaspectratio]{{figures/{f.name}}}" for f in shown)
    return slide(title, body, notes)


def bullet_body(lines: list[str], size: str = "small", most: int = 8, width: int = 150) -> str:
    """An itemize that fits a slide: at most `most` lines, each cut to `width` characters."""
    shown = [line if len(line) <= width else line[: width - 3].rstrip() + "..." for line in lines[:most]]
    return f"\\{size}\n" + latex_items(shown)


def verdict_lines(built: list[Table]) -> list[str]:
    """The paired-comparison verdicts for AUROC at each label fraction, shortest form for a slide."""
    paired = by_name(built).get("week6_paired_differences")
    if paired is None or not paired.records:
        return ["No paired comparison yet."]
    return [f"{r['comparison']}, {r['label_fraction']:.0%}: {r['verdict']} ({interval_text(r)})" for r in paired.records if r["metric"] == "test_auroc"]


def slides(dataset: str, built: list[Table], figures: list[PaperFigure]) -> tuple[str, str]:
    """The talk: 10–12 Beamer slides (question, data, methods, key figures, verdicts, calibration,
    limitations) with speaker notes; returns (LaTeX, notes as Markdown)."""
    t = by_name(built)
    base = t.get("week2_baselines")
    best = best_on_validation(base.records) if base and base.records else None
    ssl = t.get("week4_ssl_pretraining")
    knn = "; ".join(
        f"{r['method']} seed {r['seed']}: kNN validation AUROC {fmt(r['knn_val_auroc_init'])} at initialisation, {fmt(r['knn_val_auroc'])} at the end"
        for r in (ssl.records if ssl else [])
    )
    frames = [
        slide(
            "The question",
            bullet_body([QUESTION.removeprefix("Question: ").capitalize()]),
            f"Open with why label scarcity matters for {dataset}. {PROMPT}: your motivation in one sentence.",
        ),
        slide(
            "Data",
            bullet_body([dataset_text(dataset)])
            + "".join(
                "\n\\centering\\includegraphics[width=0.9\\linewidth,height=0.55\\textheight,keepaspectratio]{figures/samples_per_class.png}"
                for f in figures
                if f.name == "samples_per_class.png"
            ),
            "Say what the classes look like, how many images each split has, and how unbalanced they are.",
        ),
        slide(
            "What was compared",
            bullet_body(experiments_lines(built)),
            "Summarise: supervised baselines, SimCLR/MoCo pretraining, linear probes and fine-tuning on label subsets, "
            "paired seeds, calibration and thresholds. Keep it under a minute.",
        ),
        slide(
            "Supervised baselines",
            bullet_body(
                [f"{r['key']} (seed {r['seed']}): test AUROC {fmt(r['test_auroc'])}, ECE {fmt(r['test_ece'])}" for r in (base.records[:6] if base else [])]
                or ["no baseline run"]
            ),
            f"The reference point. Best on validation: {best['key'] if best else 'none'}. {PROMPT}: what the error gallery showed.",
        ),
        figure_slide(
            figures,
            "SSL pretraining",
            "ssl_curves_simclr.png",
            "ssl_curves_moco.png",
            notes=f"{knn}. Say whether the loss and the kNN curve levelled off within the budget.",
        ),
        figure_slide(
            figures,
            "Label efficiency",
            "week5_label_efficiency.png",
            "label_efficiency_acc.png",
            notes="AUROC and accuracy against the label fraction, mean and spread over seeds; controls included.",
        ),
        figure_slide(
            figures,
            "Paired differences",
            "week6_paired_differences.png",
            notes="Each point is a paired difference over seeds with its 95% interval; the zero line is no difference.",
        ),
        slide(
            "Verdicts (AUROC, 95% intervals)",
            bullet_body(verdict_lines(built), size="scriptsize", most=7),
            "Read each verdict from its interval. Say plainly where SSL did not help.",
        ),
        figure_slide(
            figures,
            "Calibration",
            "reliability_before_after.png",
            notes="Reliability before and after temperature scaling; the test ECE change has a bootstrap interval (week 6 table).",
        ),
        figure_slide(
            figures, "Thresholds for screening", "roc.png", "pr.png", notes="Operating points chosen on validation, applied to test. Say which class is positive."
        ),
        figure_slide(figures, "Robustness", "robustness.png", notes="How AUROC, accuracy and ECE change with each corruption's severity."),
        slide(
            "Limitations and take-aways",
            bullet_body(limitations_lines(built, dataset), most=5, width=110),
            f"{PROMPT}: your one-sentence answer to the question, and what you would run next.",
        ),
    ]
    shown = [f for f in frames if f is not None]
    latex = (
        "\\documentclass[aspectratio=169]{beamer}\n\\usepackage{booktabs}\n"
        f"\\title{{{tables.latex_escape(dataset)}: when does self-supervised pretraining help?}}\n\\author{{DRAFT}}\n"
        "\\begin{document}\n\\frame{\\titlepage}\n" + "\n\n".join(f for f, _ in shown) + "\n\\end{document}\n"
    )
    notes = f"# Speaker notes: {dataset} ({len(shown) + 1} slides, 10–12 minutes)\n\n" + "\n".join(n for _, n in shown)
    return latex, notes


def latex_engine() -> tuple[str, list[str]] | None:
    """The first installed LaTeX engine and its command, or None."""
    return next(((name, command) for name, command in LATEX_ENGINES if shutil.which(command[0])), None)


def run_engine(command: list[str], cwd: Path) -> tuple[int | None, str]:
    """Run a LaTeX engine with no input in its own process group, killing the group after
    LATEX_SECONDS; returns (its exit code, None on timeout; its output)."""
    with subprocess.Popen(
        command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True
    ) as process:
        try:
            output, _ = process.communicate(timeout=LATEX_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return None, ""
    return process.returncode, output


def build_pdf(tex: Path) -> tuple[Path | None, str]:
    """Compile a .tex file next to itself; returns (the PDF or None, one line saying what happened)."""
    engine = latex_engine()
    if engine is None:
        return None, f"{tex.stem}.pdf not built: {INSTALL_LATEX}"
    name, command = engine
    tex.with_suffix(".pdf").unlink(missing_ok=True)  # a PDF from an earlier compare must not pass for this one
    for _ in range(2 if name == "pdflatex" else 1):  # pdflatex needs a second pass for references
        code, output = run_engine([*command, tex.name], tex.parent)
        if code is None:
            return None, f"{tex.stem}.pdf not built: {name} ran over {LATEX_SECONDS} s"
        if code != 0:
            error = next((line for line in output.splitlines() if line.startswith("!")), f"exit code {code}")
            return None, f"{tex.stem}.pdf not built: {name} failed ({error}); see {tex.with_suffix('.log')}"
    for suffix in BUILD_LEFTOVERS:
        tex.with_suffix(suffix).unlink(missing_ok=True)
    return tex.with_suffix(".pdf"), f"{tex.stem}.pdf built with {name}"


def write_paper(dataset: str, built: list[Table], out_dir: Path) -> tuple[list[Path], list[str]]:
    """Write the figures, draft.md/.tex, slides.tex and speaker_notes.md under `out_dir`, and
    build the PDFs when a LaTeX engine is installed; returns (files written, status lines)."""
    figures = collect_figures(built, out_dir, dataset)
    talk, notes = slides(dataset, built, figures)
    texts: Mapping[str, str] = {
        "draft.md": draft_markdown(dataset, built, figures),
        "draft.tex": draft_latex(dataset, built, figures),
        "slides.tex": talk,
        "speaker_notes.md": notes,
    }
    paths = [out_dir / "figures" / f.name for f in figures]
    for name, text in texts.items():
        write_atomic(out_dir / name, text)
        paths.append(out_dir / name)
    said = []
    for tex in ("draft.tex", "slides.tex"):
        pdf, line = build_pdf(out_dir / tex)
        said.append(line)
        if pdf is not None:
            paths.append(pdf)
    return paths, said
