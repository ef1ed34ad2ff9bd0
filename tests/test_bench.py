"""The performance suite runs end to end and writes a complete table (its numbers are not judged here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.synthetic import write_synthetic

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_perf_suite_writes_every_path_with_rates_memory_and_flop_fractions(tmp_path):
    # medmnist's Dataset (the per-sample reference path) insists on the official split size: 546 train images.
    root = tmp_path / "data"
    root.mkdir()
    write_synthetic(root, "breastmnist", counts={"train": 546, "val": 32, "test": 32})
    out = tmp_path / "perf.json"
    command = [
        sys.executable,
        "bench/perf.py",
        "--dataset",
        "breastmnist",
        "--data-root",
        str(root),
        "--models",
        "smallcnn",
        "--workloads",
        "supervised,simclr,moco,features,probe",
        "--min-time",
        "0.05",
        "--batch",
        "32",
        "--ssl-batch",
        "32",
        "--probe-epochs",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--matmul-seconds",
        "0.05",
        "--workers",
        "0",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    paths = {(r["workload"], r["path"]) for r in report["rows"]}
    for workload in ("supervised", "simclr", "moco"):
        for path in ("ours", "-batched_aug", "-channels_last", "pipeline epoch", "per-sample w0"):
            assert (workload, path) in paths
    assert {("features", "ours"), ("features", "per-sample w0"), ("probe", "ours"), ("probe", "per-sample w0")} <= paths
    for row in report["rows"]:
        assert row["images_per_s"] > 0 and row["wall_s"] > 0 and row["peak_mem_mib"] > 0
        if row["workload"] in ("supervised", "simclr", "moco"):
            assert 0 < row["flop_fraction"] and len(row["extra"]["rates"]) == 2
    matmul = report["meta"]["matmul"]
    training = [r for r in report["rows"] if r["workload"] in ("supervised", "simclr", "moco")]
    # three samples at the start, then one before and one after each measurement of each training path
    assert matmul["samples"]["fp32"] == 3 + 2 * sum(len(r["extra"]["rates"]) for r in training)
    best, median, worst = matmul["best_median_worst_tflops"]["fp32"]
    assert best == report["meta"]["matmul_tflops"]["fp32"] and best >= median >= worst > 0
    for row in training:
        rates, references = row["extra"]["rates"], row["extra"]["references"]
        assert all(worst <= reference <= best for reference in references)
        # the kept measurement's reference (rates are rounded: a tie may hide which one was kept)
        expected = [
            row["extra"]["flops_per_image"] * row["images_per_s"] / (reference * 1e12) for rate, reference in zip(rates, references) if rate == row["images_per_s"]
        ]
        assert any(row["flop_fraction"] == pytest.approx(value, rel=0.01) for value in expected)
    table = done.stdout[done.stdout.index("\nworkload ") :]
    assert len([line for line in table.splitlines() if line.startswith(("supervised", "simclr", "moco", "features", "probe"))]) == len(report["rows"])


@pytest.mark.slow
def test_study_timing_continues_in_a_kept_store_and_appends_its_step_log(tmp_path):
    # bench/gpu_check.sh relies on this: a call cut off by a time limit is run again and
    # reuses what finished, and the step log of both calls adds up to the whole study.
    # relative paths, as the script passes them: the studies run in the store's folder
    (tmp_path / "data").mkdir()
    write_synthetic(tmp_path / "data", "breastmnist")
    out = tmp_path / "study.json"
    command = [
        sys.executable,
        str(REPO / "bench/perf.py"),
        "--dataset",
        "breastmnist",
        "--data-root",
        "data",
        "--workloads",
        "none",
        "--study",
        "--study-profile",
        "smoke",
        "--study-store",
        "store",
        "--out",
        "study.json",
    ]
    log = tmp_path / "study-breastmnist.log"
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    ran = [line.split(":")[0] for line in log.read_text().splitlines() if line.startswith("[study]") and ": ran " in line]
    assert "[study] eda" in ran and "[study] compare" in ran
    report = json.loads(out.read_text())
    [row] = report["rows"]
    assert row["path"] == "smoke breastmnist" and "finished steps reused" in row["note"] and "FAILED" not in row["note"]
    assert report["meta"]["matmul"]["samples"]["fp32"] == 1  # no training rows: one sample, for the record

    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    lines = log.read_text().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("[study]") and ": ran " in line][: len(ran)] == ran
    reused = {line.split(":")[0] for line in lines if line.startswith("[study]") and ": reused " in line}
    assert set(ran) - {"[study] compare"} <= reused


def test_split_bn_cost_times_both_modules_on_the_same_batch(tmp_path):
    out = tmp_path / "split.json"
    command = [
        sys.executable,
        "bench/split_bn_cost.py",
        "--models",
        "smallcnn",
        "--batch",
        "16",
        "--splits",
        "4",
        "--rounds",
        "2",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "smallcnn" and row["splits"] == 4 and row["plain_ms"] > 0 and row["split_ms"] > 0
    assert row["ratio_range"][0] <= row["ratio"] <= row["ratio_range"][1]
    assert "| smallcnn |" in done.stdout.splitlines()[-1]


@pytest.mark.slow
def test_classic_vs_run_times_both_in_turns_and_profiles_our_run(tmp_path):
    # medmnist's Dataset and Evaluator insist on the official split sizes
    write_synthetic(tmp_path, "breastmnist", counts={"train": 546, "val": 78, "test": 156})
    out = tmp_path / "classic.json"
    command = [
        sys.executable,
        "bench/classic_vs_run.py",
        "--dataset",
        "breastmnist",
        "--data-root",
        str(tmp_path),
        "--epochs",
        "1",
        "--rounds",
        "1",
        "--profile",
        "--out",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    [row] = report["rounds"]
    assert row["classic_s"] > 0 and row["ours_s"] > 0 and row["ratio"] == pytest.approx(row["classic_s"] / row["ours_s"], rel=0.01)
    profile = report["profile"]
    assert 0 < profile["training epochs"] < profile["entry point process"]
    assert profile["imports"] > 0 and profile["store preparation"] > 0 and profile["figures"] > 0
    assert "batch-norm recomputation" in profile  # one epoch of 5 steps: recomputed


def test_cpu_bf16_measures_speed_and_metrics_in_both_precisions(tmp_path, synthetic_root):
    out = tmp_path / "bf16.json"
    command = [sys.executable, "bench/cpu_bf16.py", "--data-root", str(synthetic_root), "--batch", "16", "--rounds", "1", "--epochs", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["speed"]["train_fp32_ms"] > 0 and report["speed"]["train_bf16_over_fp32"] > 0
    assert set(report["quality"]) == {"fp32", "bf16"}
    assert all(0 <= values["val_auroc"] <= 1 for values in report["quality"].values())
