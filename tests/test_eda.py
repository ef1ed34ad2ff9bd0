"""`eda` and the error gallery: duplicate detection, class counts, mistake selection, logged runs."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from entrypoints import baseline, eda
from entrypoints.common import main
from pipeline.data import ArraySplit, load_arrays
from pipeline.steps.eda import balance_rows, class_counts, duplicate_report
from pipeline.gallery import GALLERY_CSV, GALLERY_PNG, most_confident_mistakes
from tests.conftest import all_runs, artifact_paths, assert_contract, cli_env, mlflow_run

NAMES = {"0": "malignant", "1": "benign"}


def download(tracking, run_id, path, tmp_path):
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp_path), tracking_uri=tracking)


def planted_splits():
    """Random (hence distinct) images with planted exact duplicates inside and across splits."""
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 40), ("val", 10), ("test", 12))}
    labels = {s: np.array([0, 1] * (len(images[s]) // 2)) for s in images}
    images["train"][5] = images["train"][0]  # within train (labels alternate 0, 1, ...: #0 is 0, #5 is 1)
    images["train"][9] = images["train"][0]  # a third copy (#9 is 1): 3 pairs, 2 with conflicting labels
    images["train"][7] = images["train"][2]  # within train, labels 0 vs 1: a conflict
    images["test"][3] = images["train"][11]  # train/test
    images["test"][4] = images["val"][6]  # val/test
    images["val"][1] = images["train"][20]  # train/val
    return {s: ArraySplit(images[s], labels[s]) for s in images}


def test_duplicate_check_finds_planted_duplicates_within_and_across_splits():
    report = duplicate_report(planted_splits())
    train = report["within"]["train"]
    assert (train["duplicate_images"], train["groups"], train["pairs"]) == (3, 2, 4)
    assert train["label_conflict_pairs"] == 3
    assert [0, 5] in train["examples"] and [2, 7] in train["examples"]
    assert report["within"]["val"]["duplicate_images"] == report["within"]["test"]["duplicate_images"] == 0
    across = report["across"]
    assert across["train/test"]["examples"] == [[11, 3]] and across["train/test"]["images_in_second"] == 1
    assert across["val/test"]["examples"] == [[6, 4]]
    assert across["train/val"]["examples"] == [[20, 1]]
    assert across["train/val"]["label_conflict_pairs"] == 1  # train #20 is class 0, val #1 is class 1


def test_class_counts_and_balance_rows():
    assert class_counts(np.array([1, 1, 0, 1])) == {0: 1, 1: 3}
    assert class_counts(np.array([1, 1])) == {0: 0, 1: 2}
    rows = balance_rows({"train": ArraySplit(np.zeros((4, 2, 2), np.uint8), np.array([1, 1, 0, 1]))}, NAMES)
    assert rows == [
        {"split": "train", "label": 0, "class": "malignant", "count": 1, "fraction": 0.25},
        {"split": "train", "label": 1, "class": "benign", "count": 3, "fraction": 0.75},
    ]


def test_most_confident_mistakes_selects_by_probability_of_the_predicted_class():
    predictions = pd.DataFrame(
        {
            "index": [0, 1, 2, 3, 4, 5],
            "label": [1, 0, 1, 0, 1, 0],
            "prob": [0.9, 0.95, 0.02, 0.3, 0.4, 0.6],  # mistakes: 1 (p(1)=.95), 2 (p(0)=.98), 4 (p(0)=.6), 5 (p(1)=.6)
        }
    )
    top = most_confident_mistakes(predictions, n=3)
    assert top["index"].tolist() == [2, 1, 4]  # ties (4 and 5 at 0.6) go to the lower index
    assert top["predicted"].tolist() == [0, 1, 0]
    assert top["confidence"].tolist() == pytest.approx([0.98, 0.95, 0.6])
    assert top["prob"].tolist() == [0.02, 0.95, 0.4]
    assert len(most_confident_mistakes(predictions.assign(label=[1, 1, 0, 0, 0, 1]), n=5)) == 0


def test_eda_logs_one_run_with_counts_tables_figures(synthetic_root, tracking_uri, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    main(eda.command, ["--dataset", "pneumoniamnist", "--run-id", "none"])
    out = capsys.readouterr().out
    assert "eda pneumoniamnist (28 px)" in out and "exact duplicates within splits" in out
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED"
    assert_contract(tracking_uri, run, classifier=False)
    assert (run.data.tags["stage"], run.data.tags["week"], run.data.tags["model"], run.data.tags["seed"]) == ("eda", "2", "-", "0")
    arrays = load_arrays("pneumoniamnist", 28, synthetic_root)
    for split, data in arrays.items():
        for label in (0, 1):
            assert run.data.metrics[f"{split}_class{label}_count"] == np.sum(data.labels == label)
        assert f"  {split:<5} n={len(data.labels):<5}" in out
    assert {
        "eda/class_balance.json",
        "eda/class_balance.md",
        "eda/summary.json",
        "eda/summary.txt",
        "eda/samples_per_class.png",
        "eda/intensity_histograms.png",
        "eda/duplicate_examples.png",
    } <= artifact_paths(tracking_uri, run.info.run_id)
    table = json.loads(open(download(tracking_uri, run.info.run_id, "eda/class_balance.json", tmp_path)).read())
    assert table["columns"] == ["split", "label", "class", "count", "fraction"] and len(table["data"]) == 6
    summary = json.loads(open(download(tracking_uri, run.info.run_id, "eda/summary.json", tmp_path)).read())
    assert summary["stats"]["test"]["n"] == len(arrays["test"].labels)
    assert summary["stats"]["train"]["dtype"] == "uint8" and summary["stats"]["train"]["image_shape"] == [28, 28]
    assert set(summary["duplicates"]["across"]) == {"train/val", "train/test", "val/test"}


def test_gallery_of_a_classifier_run(synthetic_root, tracking_uri, monkeypatch, capsys, tmp_path):
    """A baseline logs its own gallery; `eda --run-id latest` rebuilds it from the logged predictions."""
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    config = tmp_path / "fast.yaml"
    config.write_text("epochs: 1\nbatch_size: 32\nbootstrap: 0\n")
    main(eda.command, ["--dataset", "breastmnist"])
    assert "error gallery: skipped" in capsys.readouterr().out
    main(baseline.command, ["--dataset", "breastmnist", "--config", str(config)])
    main(eda.command, ["--dataset", "breastmnist", "--gallery-n", "3"])
    assert "most confident test mistakes logged" in capsys.readouterr().out
    eda_run, base_run = all_runs(tracking_uri)[:2]
    assert base_run.data.tags["stage"] == "baseline" and eda_run.data.tags["source_run_id"] == base_run.info.run_id
    assert {GALLERY_PNG, GALLERY_CSV} <= artifact_paths(tracking_uri, base_run.info.run_id)
    assert {GALLERY_PNG, GALLERY_CSV} <= artifact_paths(tracking_uri, eda_run.info.run_id)
    predictions = pd.read_csv(download(tracking_uri, base_run.info.run_id, "predictions/test.csv", tmp_path / "p"))
    gallery = pd.read_csv(download(tracking_uri, eda_run.info.run_id, GALLERY_CSV, tmp_path / "g"), keep_default_na=False)
    assert list(gallery) == ["index", "label", "predicted", "prob", "confidence", "hypothesis", "possible_fix"]
    assert {*gallery.hypothesis, *gallery.possible_fix} <= {""}  # left for the student's words
    wrong = predictions[(predictions.prob >= 0.5) != (predictions.label == 1)]
    expected = np.sort(np.maximum(wrong.prob, 1 - wrong.prob).to_numpy())[::-1][:3]
    assert len(gallery) == min(3, len(wrong))
    assert gallery.confidence.to_numpy() == pytest.approx(expected, abs=1e-5)
    merged = gallery.merge(predictions, on="index", suffixes=("", "_logged"))
    assert (merged.label == merged.label_logged).all() and merged.prob.to_numpy() == pytest.approx(merged.prob_logged.to_numpy(), abs=1e-5)
    assert (merged.predicted != merged.label).all()
    own = pd.read_csv(download(tracking_uri, base_run.info.run_id, GALLERY_CSV, tmp_path / "o"))
    assert own["index"].tolist()[:3] == gallery["index"].tolist() and list(own) == list(gallery)


def test_gallery_of_an_unknown_run_is_one_clear_line(synthetic_root, tracking_uri, monkeypatch, capsys):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    with pytest.raises(SystemExit) as exit_info:
        main(eda.command, ["--dataset", "breastmnist", "--run-id", "0123456789abcdef"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "run '0123456789abcdef' was not found" in err and "Traceback" not in err
    assert all_runs(tracking_uri) == []  # refused before the exploration ran and logged anything


@pytest.mark.slow
def test_eda_through_mlflow_run(synthetic_root, tracking_uri, tmp_path):
    result = mlflow_run("eda", {"dataset": "pneumoniamnist"}, cli_env(synthetic_root, tracking_uri), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eda pneumoniamnist (28 px)" in result.stdout
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.params["run_id"] == "latest"
    assert_contract(tracking_uri, run, classifier=False)
    assert "eda/samples_per_class.png" in artifact_paths(tracking_uri, run.info.run_id)
