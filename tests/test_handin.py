"""What a student hands in, from the smoke study's store: `results/week1..10/<dataset>/<name>/` with
the plan's file names and READMEs whose numbers match the cited runs, the draft and slides built to
PDF by a real LaTeX engine (the study's `--export-results smoke`), the skipped ImageNet step with its reason, and `results/` committable."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from entrypoints import compare
from entrypoints.common import main
from pipeline import paper, tables
from pipeline.handin import analysed_runs, json_safe
from pipeline.render import Table
from pipeline.report import baseline_key
from tests.conftest import REPO, all_runs

HAS_LATEX = paper.latex_engine() is not None
SKIP_REASON = "ImageNet weights for resnet18 are not available offline"


@pytest.fixture()
def handin(smoke_study):
    """The smoke study's store and folder: the study exported its hand-ins as `smoke`."""
    return smoke_study


def week(out, n):
    return out / "results" / f"week{n}" / "breastmnist" / "smoke"


def test_every_week_has_its_folder_readme_and_the_plans_file_names(handin):
    _, out = handin
    expected = {
        1: ["environment.md", "eda_summary.json", "week1_class_balance.md", "samples_per_class.png", "intensity_histograms.png"],
        2: [
            "metrics_smallcnn.json",
            "cm_smallcnn.png",
            "reliability_smallcnn.png",
            "learning_curves_smallcnn.png",
            "reliability_class1_smallcnn.png",
            "reliability_class1_eqfreq_smallcnn.png",
            "misclassified_gallery.png",
            "misclassified_gallery.csv",
            "week2_baselines.md",
            "week2_baselines.csv",
        ],
        3: ["week3_augment_ablation.md", "week3_augment_ablation.png"],
        4: ["week4_ssl_pretraining.md", "ssl_loss_simclr_s0.png", "ssl_config_simclr_s1.json"],
        5: ["week5_label_efficiency.md", "auroc_vs_fraction.png", "acc_vs_fraction.png"],
        6: ["week6_paired_differences.csv", "week6_calibration.md", "reliability_before.png", "reliability_after.png"],
        7: ["week7_thresholds.md", "roc.png", "pr.png", "high_confidence_errors.csv"],
        8: ["week8_robustness.md", "robustness.png", "mc_dropout_entropy.png", "ethics_limits_note.md"],
        9: ["draft.md", "draft.tex", "figures/roc.png", "figures/label_efficiency_acc.png"],
        10: ["slides.tex", "speaker_notes.md"],
    }
    for n, names in expected.items():
        folder = week(out, n)
        assert (folder / f"README_week{n}.md").is_file(), n
        for name in names:
            assert (folder / name).is_file(), (n, name)
        for image in folder.rglob("*.png"):  # every figure opens
            with Image.open(image) as opened:
                opened.verify()
    assert not list((out / "results").rglob(".smoke.*"))  # no staging folder left behind


def test_week2_readme_numbers_match_the_runs_and_keep_the_prompts(handin):
    uri, out = handin
    folder = week(out, 2)
    readme = (folder / "README_week2.md").read_text()
    for section in ("## Dataset recap", "## Baseline comparison", "## Calibration snapshot", "## Error analysis"):
        assert section in readme, section
    assert readme.count("YOUR WORDS") >= 3
    metrics = json.loads((folder / "metrics_smallcnn.json").read_text())
    runs = {r.info.run_id: r for r in all_runs(uri)}
    (row,) = [line for line in readme.splitlines() if re.match(r"\| smallcnn \| [0-9a-f]{8} \|", line)]
    run = next(r for i, r in runs.items() if i.startswith(row.split(" | ")[1]))
    assert metrics["auroc"] == pytest.approx(run.data.metrics["test_auroc"])
    assert f"| {run.data.metrics['test_auroc']:.3f} |" in row and f"| {run.data.metrics['test_ece']:.3f} |" in row
    # the skipped ImageNet baseline says so, with the reason
    assert "## Not run" in readme and "baseline_1_resnet18_head" in readme and SKIP_REASON in readme
    gallery = list(csv.DictReader((folder / "misclassified_gallery.csv").open()))
    assert gallery and {"hypothesis", "possible_fix"} <= set(gallery[0])


def test_weekly_readmes_cite_their_runs_and_the_environment(handin):
    _, out = handin
    week1 = (week(out, 1) / "README_week1.md").read_text()
    assert "screenshot_env.png" in week1 and "YOUR WORDS" in week1
    environment = (week(out, 1) / "environment.md").read_text()
    for item in ("| Python |", "| torch |", "| Device |", "| CPU |", "| mlflow |"):
        assert item in environment
    week5 = (week(out, 5) / "README_week5.md").read_text()
    table = (out / "reports" / "breastmnist" / "week5_label_efficiency.md").read_text()
    assert table.split("\n", 2)[2].strip() in week5  # the same rows compare wrote
    week8 = (week(out, 8) / "README_week8.md").read_text()
    assert "Ethics and limits note" in week8 and "YOUR WORDS" in week8
    errors = list(csv.DictReader((week(out, 7) / "high_confidence_errors.csv").open()))
    assert not errors or {"note", "hypothesis", "possible_fix"} <= set(errors[0])


def test_a_used_export_name_is_refused(handin, capsys):
    uri, out = handin
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        with pytest.raises(SystemExit) as exit_:
            main(compare.command, ["--dataset", "breastmnist", "--out", str(out / "again"), "--export-results", "smoke", "--results-root", str(out / "results")])
    assert exit_.value.code != 0 and "already exists" in capsys.readouterr().err
    assert not (out / "again").exists()


def test_results_are_committable_and_raw_runs_are_not(tmp_path):
    repo = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")  # the working tree's rules, committed or not
    for path in (
        "results/week2/breastmnist/alice/README_week2.md",
        "mlruns/0/meta.yaml",
        "mlflow.db",
        "runs/x/checkpoints/last.pt",
        "reports/breastmnist/draft.md",
        ".venv/bin/python",
    ):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("x")
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True, text=True, check=True).stdout
    assert "results/week2/breastmnist/alice/README_week2.md" in status
    for raw in ("mlruns/", "mlflow.db", "runs/", "reports/", ".venv/"):
        assert raw not in status, raw


@pytest.mark.skipif(not HAS_LATEX, reason="no LaTeX engine installed (.ci/run installs one)")
def test_draft_and_slides_build_to_pdf_holding_the_tables_numbers(handin):
    _, out = handin
    reports = out / "reports" / "breastmnist"
    text = subprocess.run(["pdftotext", "-layout", str(reports / "draft.pdf"), "-"], capture_output=True, text=True, check=True).stdout
    flat = " ".join(text.split())
    for section in ("Introduction", "Methods", "Experiments", "Results", "Discussion", "Limitations", "YOUR WORDS"):
        assert section in flat, section
    assert "n = 2 < 3" in flat and "¡" not in flat  # '<' typeset as itself, not as the OT1 font's inverted '!'
    assert "Reproducibility checklist" in flat and "medmnist-ssl study --dataset breastmnist" in flat
    rows = list(csv.DictReader((reports / "week5_label_efficiency.csv").open()))
    numbers = [f"{float(r['test_auroc_mean']):.3f}" for r in rows if r.get("test_auroc_mean")]
    assert numbers and all(n in flat for n in numbers), numbers
    assert (week(out, 9) / "draft.pdf").is_file() and (week(out, 10) / "slides.pdf").is_file()
    pages = subprocess.run(["pdfinfo", str(reports / "slides.pdf")], capture_output=True, text=True, check=True).stdout
    count = int(next(line.split()[-1] for line in pages.splitlines() if line.startswith("Pages:")))
    assert 10 <= count <= 13, count  # a title slide and 10-12 content slides
    notes = (reports / "speaker_notes.md").read_text()
    assert notes.count("\n## ") >= 9


def test_without_a_latex_engine_compare_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no latexmk, pdflatex or tectonic
    tex = tmp_path / "draft.tex"
    tex.write_text("\\documentclass{article}\\begin{document}x\\end{document}\n")
    pdf, line = paper.build_pdf(tex)
    assert pdf is None and "no LaTeX engine found" in line and "texlive" in line


def test_a_stuck_latex_engine_is_killed_with_its_children(tmp_path, monkeypatch):
    engine = tmp_path / "pdflatex"  # an "engine" that starts a child and hangs
    engine.write_text("#!/bin/sh\n/bin/sleep 300 &\necho $! > child.pid\n/bin/sleep 300\n")
    engine.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(paper, "LATEX_SECONDS", 1)
    tex = tmp_path / "draft.tex"
    tex.write_text("x")
    pdf, line = paper.build_pdf(tex)
    assert pdf is None and line == "draft.pdf not built: pdflatex ran over 1 s"
    child = Path(f"/proc/{(tmp_path / 'child.pid').read_text().strip()}/status")
    for _ in range(50):  # the whole group was killed: the child is gone or a zombie waiting to be reaped
        if not child.exists() or "\tZ" in child.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the engine's child outlived the timeout")


def test_latex_text_is_ascii_and_metrics_json_is_strict():
    assert tables.latex_escape("café ≥ 0.5 · ✍ /home/jürgen") == "cafe $\\geq$ 0.5 ? ? /home/jurgen"
    text = json.dumps(json_safe([{"std": float("nan"), "ci": [float("inf"), 1.0]}]))
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == [{"std": None, "ci": [None, 1.0]}]


def test_baselines_are_named_by_how_they_start():
    assert baseline_key("smallcnn", "all", "none") == "smallcnn"
    assert baseline_key("resnet18", "head", "imagenet") == "resnet18_head"
    assert baseline_key("resnet18", "all", "imagenet") == "resnet18_full"
    assert baseline_key("resnet18", "all", "none") == "resnet18_scratch"  # never merged with the ImageNet start
    table = Table(
        "t",
        "t",
        [],
        records=[
            {"analysed_kind": "baseline", "run_id": "a"},
            {"analysed_kind": "baseline", "run_id": "a"},
            {"analysed_kind": "ssl_finetune", "run_id": "b"},
            {"analysed_kind": "linear_probe", "run_id": "c"},
        ],
    )
    assert analysed_runs(table) == [("", "a"), ("_ssl_finetune", "b"), ("_linear_probe", "c")]
