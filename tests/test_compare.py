"""`compare`: tables read back from real runs, missing stages reported, atomic files, exports."""

import json
import math

import pandas as pd
from mlflow import MlflowClient
import pytest

from entrypoints import augment_ablation, baseline, compare, linear_probe, ssl_finetune, ssl_pretrain
from entrypoints.common import main
from pipeline import paired, render, report, tables, tracking, writeup
from pipeline.steps.compare import run_compare
from scipy import stats
from tests.conftest import all_runs, artifact_paths

TINY = ["--epochs", "1", "--batch-size", "32"]


def test_empty_store_reports_every_table_missing(tracking_uri, tmp_path, capsys):
    main(compare.command, ["--dataset", "pneumoniamnist", "--out", str(tmp_path / "reports")])
    out = capsys.readouterr().out
    assert out.count("MISSING") == 12
    text = (tmp_path / "reports" / "pneumoniamnist" / "week2_baselines.md").read_text()
    assert "missing: no FINISHED baseline run for pneumoniamnist" in text
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "compare"
    assert run.data.metrics["tables_missing"] == 12


def test_tables_agree_with_the_runs_they_cite(synthetic_root, tracking_uri, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    main(baseline.command, ["--dataset", "breastmnist", *TINY])
    # a newer baseline that barely trains: the export must still pick the older one, best on validation
    main(baseline.command, ["--dataset", "breastmnist", *TINY, "--lr", "1e-7", "--seed", "1"])
    main(augment_ablation.command, ["--dataset", "breastmnist", "--variants", "none,flip", "--seeds", "0,1", *TINY])
    main(ssl_pretrain.command, ["--dataset", "breastmnist", *TINY])
    main(linear_probe.command, ["--dataset", "breastmnist", "--methods", "ssl_probe,supervised", "--label-fractions", "0.5,1", "--seeds", "0,1", *TINY])
    main(ssl_finetune.command, ["--dataset", "breastmnist", "--label-fractions", "1", "--seeds", "0", *TINY])
    # a newer SSL run with its own probes: week 6 must keep to the fine-tuned encoder's probes
    main(ssl_pretrain.command, ["--dataset", "breastmnist", "--method", "moco", "--queue-size", "64", *TINY])
    main(linear_probe.command, ["--dataset", "breastmnist", "--methods", "ssl_probe", "--label-fractions", "0.5,1", "--seeds", "0,1", *TINY])
    out_root, results_root = tmp_path / "reports", tmp_path / "results"
    main(compare.command, ["--dataset", "breastmnist", "--out", str(out_root), "--export-results", "v1", "--results-root", str(results_root)])
    out = out_root / "breastmnist"
    runs = {r.info.run_id: r for r in all_runs(tracking_uri)}

    base = pd.read_csv(out / "week2_baselines.csv")
    assert len(base) == 2 and all(base.test_auroc == [runs[i].data.metrics["test_auroc"] for i in base.run_id])
    older = base.run_id[1]  # rows are newest first
    assert base.val_auroc[1] > base.val_auroc[0]
    assert base.recipe[0] != base.recipe[1] and list(base.lr.astype(str)) == ["1e-07", "0.001"]  # two recipes, told apart
    eff = pd.read_csv(out / "week5_label_efficiency.csv")
    assert len(eff) == 8 and set(eff.n) == {2}  # 2 fractions × (simclr probe, moco probe, supervised, majority class)
    assert set(eff[eff.method == "majority_class"].run_ids.fillna("")) == {""}  # a control computed from labels, no run
    for _, row in eff[eff.method != "majority_class"].iterrows():
        cited = [runs[i].data.metrics["test_auroc"] for i in row.run_ids.split()]
        assert row.test_auroc_mean == pytest.approx(sum(cited) / len(cited))
        assert {runs[i].data.tags["label_fraction"] for i in row.run_ids.split()} == {str(row.label_fraction)}
    assert {"SSL linear probe (simclr)", "SSL linear probe (moco)"} <= set(eff.method)
    week6 = pd.read_csv(out / "week6_probe_vs_finetune.csv")
    assert "ssl_finetune" in set(week6.method) and "ssl_probe" in set(week6.method)
    (finetune,) = [r for r in runs.values() if r.data.tags["stage"] == "ssl_finetune" and "mlflow.parentRunId" not in r.data.tags]
    encoder = finetune.data.tags["source_run_id"]
    assert set(week6[week6.method == "majority_class"].n) == {2}  # the control, from the probe grid's table
    for _, row in week6[~week6.method.str.startswith("baseline") & (week6.method != "majority_class")].iterrows():
        cited = [runs[i] for i in row.run_ids.split()]
        parents = {runs[c.data.tags["mlflow.parentRunId"]] for c in cited}
        assert {p.data.tags["source_run_id"] for p in parents} == {encoder}, row.method  # not the newer moco probes
        assert row.test_auroc_mean == pytest.approx(sum(c.data.metrics["test_auroc"] for c in cited) / len(cited))
    ablation = pd.read_csv(out / "week3_augment_ablation.csv")
    assert list(ablation.variant) == ["none", "flip"] and set(ablation.n) == {2} and set(ablation.seeds) == {"0 1"}
    for _, row in ablation.iterrows():
        cited = [runs[i] for i in row.run_ids.split()]
        assert {c.data.tags["augment"] for c in cited} == {row.variant}
        assert {c.data.tags["mlflow.parentRunId"] for c in cited} == {row.parent_run_id}
        for key in ("val_auroc", "test_acc", "test_auroc", "test_ece"):
            values = [c.data.metrics[key] for c in cited]
            assert row[f"{key}_mean"] == pytest.approx(sum(values) / 2)
            assert row[f"{key}_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    ssl = pd.read_csv(out / "week4_ssl_pretraining.csv")
    assert ssl.final_ssl_loss[0] == pytest.approx(runs[ssl.run_id[0]].data.metrics["ssl_loss"])
    assert dict(zip(ssl.method, ssl.bn_splits.astype(str))) == {"moco": "8", "simclr": "—"}

    for name in ("week2_baselines", "week3_augment_ablation", "week4_ssl_pretraining", "week5_label_efficiency", "week6_probe_vs_finetune"):
        assert "\\toprule" in (out / f"{name}.tex").read_text() and "|---|" in (out / f"{name}.md").read_text()
    assert (out / "week5_label_efficiency.png").stat().st_size > 0 and (out / "week3_augment_ablation.png").stat().st_size > 0
    assert not list(out.glob(".*tmp*"))
    draft = (out / "draft.md").read_text()
    assert "## Reproducibility checklist" in draft and "smallcnn" in draft and "50%" in draft
    assert "queue 64, shuffling BN over 8 chunks" in draft
    assert f"lr 1e-07, batch 32, augmentation none, seed 1; recipe {base.recipe[0]})" in draft
    assert "smallcnn trained for 1 epoch with each preset of none, flip (`none` is the control), seeds 0, 1." in draft
    assert "1 epochs" not in draft  # the fine-tuning settings:
    assert "encoder lr × one of 0.1, 1.0, chosen per label fraction on the first seed's validation AUROC, augmentation flip, seed 0." in draft
    assert "(stratified subsets, seeds 0, 1; pretraining runs per SSL method: " in draft and "random_resized_crop" in draft
    assert "## Discussion" in draft and "SSL linear probe (simclr) − supervised only, 50% of the labels (n = 2): auroc " in draft

    # every paired interval recomputes from the child runs it cites; the verdict follows from the interval
    differences = pd.read_csv(out / "week6_paired_differences.csv")
    probe_rows = differences[differences.a.str.startswith("SSL linear probe") & (differences.b == "supervised")]
    assert set(probe_rows.a) == {"SSL linear probe (simclr)", "SSL linear probe (moco)"} and len(probe_rows) == 2 * 2 * 3
    for _, row in probe_rows.iterrows():
        cited = [runs[i] for i in row.run_ids.split()]
        side = {m: {c.data.tags["seed"]: c.data.metrics[row.metric] for c in cited if c.data.tags["method"] == m} for m in ("ssl_probe", "supervised")}
        diffs = [side["ssl_probe"][seed] - side["supervised"][seed] for seed in ("0", "1")]
        mean, half = sum(diffs) / 2, stats.t.ppf(0.975, 1) * abs(diffs[0] - diffs[1]) / 2**0.5 / 2**0.5
        assert row.n == 2 and row.diff_mean == pytest.approx(mean)
        assert (row.ci_low, row.ci_high) == pytest.approx((mean - half, mean + half))
        assert row.verdict == paired.verdict(row.ci_low, row.ci_high, row.metric != "test_ece", row.n) == "too few seeds for a verdict (n = 2 < 3)"
    assert set(differences[differences.a.str.startswith("SSL fine-tune")].verdict) == {"too few seeds for a verdict (n = 1 < 3)"}
    latex = (out / "draft.tex").read_text()
    assert "\\begin{document}" in latex and "\\includegraphics[width=0.7\\linewidth]{figures/week3_augment_ablation.png}" in latex
    assert "![Augmentation ablation: test AUROC per variant](figures/week3_augment_ablation.png)" in draft
    assert (out / "figures" / "week3_augment_ablation.png").is_file() and (out / "figures" / "ssl_curves_moco.png").is_file()

    compare_run = next(r for r in all_runs(tracking_uri) if r.data.tags["stage"] == "compare")
    assert {"reports/week2_baselines.md", "reports/draft.md"} <= artifact_paths(tracking_uri, compare_run.info.run_id)
    week2 = results_root / "week2" / "breastmnist" / "v1"
    assert {"README_week2.md", "week2_baselines.csv", "reliability_smallcnn.png", "metrics_smallcnn.json"} <= {p.name for p in week2.iterdir()}
    readme = (week2 / "README_week2.md").read_text()
    assert f"{base.test_auroc[1]:.3f}" in readme
    assert f"| smallcnn | {older[:8]} |" in readme  # the smallcnn files came from the run best on validation
    exported = json.loads((week2 / "metrics_smallcnn.json").read_text())
    assert exported["auroc"] == pytest.approx(runs[older].data.metrics["test_auroc"])
    week6_readme = (results_root / "week6" / "breastmnist" / "v1" / "README_week6.md").read_text()
    assert week6_readme.count("### SSL fine-tune vs. probe") == 1 and week6_readme.count("Calibration before/after") == 1
    assert week6_readme.count("Calibration change on test") == 1 and week6_readme.count("### Paired differences") == 1

    # the checklist: every top-level run the tables cite, with its command, code version and seeds
    roots = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags and r.data.tags["stage"] != "compare"]
    commands = draft.split("Commands (one per top-level run the tables cite, oldest first):\n```\n")[1].split("```")[0]
    assert sorted(line.rsplit("# run ", 1)[1] for line in commands.splitlines()) == sorted(r.info.run_id[:8] for r in roots)
    cited = set(writeup.cited_run_ids(report.build_tables("breastmnist")))
    assert f"Runs cited by the tables: {len(cited)}, from {len(roots)} top-level runs." in draft
    assert f"Code version (hash of pipeline/, configs/ and mlruns_template/): {tracking.code_version()} ({len(cited)} runs)." in draft
    assert "- Seeds: 0 1; label subsets" in draft

    # exporting under a used name again is refused before anything is written or logged
    before = {p: p.read_bytes() for p in results_root.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        main(compare.command, ["--dataset", "breastmnist", "--out", str(out_root), "--export-results", "v1", "--results-root", str(results_root)])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in results_root.rglob("*") if p.is_file()}


def test_exported_best_baseline_is_chosen_on_validation_not_test():
    newest_first = [
        {"run_id": "a", "val_auroc": 0.70, "test_auroc": 0.95},
        {"run_id": "b", "val_auroc": 0.80, "test_auroc": 0.60},
        {"run_id": "c", "val_auroc": None, "test_auroc": 0.99},
        {"run_id": "d", "val_auroc": 0.80, "test_auroc": 0.70},
    ]
    assert render.best_on_validation(newest_first)["run_id"] == "b"  # the newer of the two best on validation
    one_class = [{"run_id": "n", "val_auroc": float("nan")}, {"run_id": "o", "val_auroc": 0.6}]
    assert render.best_on_validation(one_class)["run_id"] == "o"  # NaN (a one-class split) ranks last


def test_latex_escapes_and_mean_std_formatting():
    row = tables.aggregate([{"m": "a", "x": 1.0}, {"m": "a", "x": 3.0}], ("m",), ("x",))[0]
    assert tables.mean_std(row, "x") == "2.000 ± 1.414" and row["n"] == 2
    single = tables.aggregate([{"m": "a", "x": 1.0}], ("m",), ("x",))[0]
    assert tables.mean_std(single, "x") == "1.000" and math.isnan(single["x_std"])  # one run measures no spread
    assert tables.latex_escape("a_b 50% ± τ") == "a\\_b 50\\% $\\pm$ $\\tau$"
    assert tables.latex_escape("{x}$ ~^ → ×") == "\\{x\\}\\$ \\textasciitilde{}\\textasciicircum{} $\\to$ $\\times$"


def test_a_grid_without_results_is_missing_and_its_stale_figure_goes(tracking_uri, tmp_path):
    client = MlflowClient()
    run = client.create_run("0", tags={"dataset": "breastmnist", "stage": "augment_ablation"})
    client.set_terminated(run.info.run_id, "FINISHED")  # its children were deleted
    out = tmp_path / "reports"
    (out / "breastmnist").mkdir(parents=True)
    (out / "breastmnist" / "week3_augment_ablation.png").write_bytes(b"an earlier compare's figure")
    built, _ = run_compare("breastmnist", str(out))
    ablation = next(t for t in built if t.name == "week3_augment_ablation")
    assert not ablation.rows and ablation.missing.startswith("missing: the newest FINISHED run of this stage")
    assert not (out / "breastmnist" / "week3_augment_ablation.png").exists()


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../../x", "a/b", ".."])
def test_an_export_name_must_be_a_plain_folder_name(tracking_uri, tmp_path, capsys, name):
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        main(compare.command, ["--dataset", "breastmnist", "--out", str(tmp_path / "reports"), "--export-results", name, "--results-root", str(results)])
    assert exit_info.value.code != 0 and "must be a plain name" in capsys.readouterr().err
    assert not results.exists() and not (tmp_path / "x").exists()
