"""What a user sees in MLflow after the smoke study: every classifier run's inputs (the Dataset
column), MLflow models that load without this project's code and reproduce their runs' test
logits, the registry's champion chosen by validation AUROC, one value per epoch in every curve."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from entrypoints import compare
from entrypoints.common import main
from pipeline.data import load_splits
from tests.conftest import REPO, all_runs


def float_test_images(root) -> torch.Tensor:
    return load_splits("breastmnist", 28, str(root), torch.device("cpu")).test.images.float() / 255.0


def logged_logits(uri: str, run_id: str) -> np.ndarray:
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/predictions/test.csv")
    return pd.read_csv(io.StringIO(text)).logit.to_numpy()


def test_every_classifier_run_logs_its_inputs(smoke_store):
    uri, _ = smoke_store
    runs = all_runs(uri)
    classifiers = [r for r in runs if r.data.tags.get("kind") == "classifier"]
    assert len(classifiers) > 10
    for run in classifiers:
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "val", "test"}, run.info.run_name
        fraction = float(run.data.tags.get("label_fraction", 1.0))
        expected = "breastmnist-train" if fraction >= 1 else f"breastmnist-train-f{fraction:g}-s{run.data.tags['seed']}"
        assert inputs["train"].name == expected and inputs["test"].name == "breastmnist-test"
        assert inputs["train"].source_type == "local" and "breastmnist.npz" in inputs["train"].source
    subsets = {i.dataset.digest for r in classifiers for i in r.inputs.dataset_inputs if i.dataset.name.startswith("breastmnist-train-f")}
    full = {i.dataset.digest for r in classifiers for i in r.inputs.dataset_inputs if i.dataset.name == "breastmnist-train"}
    assert len(full) == 1 and len(subsets) > 1 and not subsets & full  # a label subset is its own dataset
    for run in [r for r in runs if r.data.tags.get("stage") == "ssl_pretrain"]:
        assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"train", "val"}


def test_models_load_without_the_project_and_reproduce_their_runs(smoke_store, synthetic_root):
    uri, _ = smoke_store
    runs = {r.info.run_id: r for r in all_runs(uri)}
    images = float_test_images(synthetic_root)
    experiments = [e.experiment_id for e in MlflowClient().search_experiments()]
    models = mlflow.search_logged_models(experiment_ids=experiments, output_format="list")
    by_stage = {}
    for model in models:
        by_stage.setdefault(runs[model.source_run_id].data.tags["stage"], []).append(model)
    assert sorted(by_stage) == ["augment_ablation", "baseline", "linear_probe", "ssl_finetune"]
    assert all(len(found) == 1 for found in by_stage.values())  # the baseline's own, and one selected model per grid
    for stage, (model,) in by_stage.items():
        run = runs[model.source_run_id]
        source = run.data.tags["selected_run_id"] if stage != "baseline" else run.info.run_id
        if stage != "baseline":  # the grid's child with the best validation AUROC, never test
            children = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == run.info.run_id and "best_val_auroc" in r.data.metrics]
            assert runs[source].data.metrics["best_val_auroc"] == max(r.data.metrics["best_val_auroc"] for r in children)
        loaded = mlflow.pytorch.load_model(f"models:/{model.model_id}")
        assert not type(loaded).__module__.startswith("pipeline")  # a torch.export graph, not this project's class
        with torch.no_grad():
            logits = loaded(images).numpy()
        np.testing.assert_allclose(logits, logged_logits(uri, source), rtol=1e-4, atol=1e-4)
        linked = {m.key: m.value for m in model.metrics}
        prefix = "" if stage == "baseline" else "selected_"
        assert linked[f"{prefix}test_auroc"] == pytest.approx(runs[source].data.metrics["test_auroc"])
        assert f"{prefix}best_val_auroc" in linked
        info = mlflow.models.get_model_info(f"models:/{model.model_id}")
        spec = info.signature.inputs.to_dict()[0]["tensor-spec"]
        assert spec["dtype"] == "float32" and list(spec["shape"]) == [-1, 1, 28, 28]


def test_compare_registers_the_best_validation_model_as_champion(smoke_store):
    uri, folder = smoke_store
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    models = mlflow.search_logged_models(experiment_ids=experiments, output_format="list")
    val = {m.model_id: next(x.value for x in m.metrics if x.key.endswith("best_val_auroc")) for m in models}
    champion = client.get_model_version_by_alias("breastmnist-classifier", "champion")
    model_id = champion.source.removeprefix("models:/")
    assert val[model_id] == max(val.values())
    (compare_run,) = [r for r in all_runs(uri) if r.data.tags.get("stage") == "compare"]
    assert compare_run.data.tags["champion_model_id"] == model_id
    main(compare.command, ["--dataset", "breastmnist", "--out", str(folder / "again")])  # no new version for the same model
    assert [v.version for v in client.search_model_versions("name = 'breastmnist-classifier'")] == [champion.version]
    loaded = mlflow.pytorch.load_model("models:/breastmnist-classifier@champion")
    assert loaded(torch.zeros(3, 1, 28, 28)).shape == (3,)


def test_every_curve_has_one_value_per_epoch(smoke_store):
    uri, _ = smoke_store
    client = MlflowClient()
    for run in [r for r in all_runs(uri) if r.data.tags.get("kind") == "classifier" and "best_epoch" in r.data.metrics]:
        for key in ("train_loss", "val_loss", "val_auroc", "val_acc", "val_ece"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)) and steps, (run.info.run_name, key, steps)


CHROMIUM = Path("/usr/bin/chromium")


@contextlib.contextmanager
def mlflow_ui(uri: str, port: int):
    """`mlflow ui` on this store, as `make ui` starts it, until the block ends."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_ui_opens_on_the_study_with_datasets_models_and_a_metric_column(smoke_store, free_tcp_port, tmp_path):
    from playwright.sync_api import sync_playwright

    uri, folder = smoke_store
    with mlflow_ui(uri, free_tcp_port) as url:
        printed = subprocess.run(
            [sys.executable, "-m", "entrypoints.runs", "address", "--dataset", "breastmnist", "--url", url],
            env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)},
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=120,
        )
        address = printed.stdout.split()[1]
        assert address.startswith(url) and "workflowType=machine_learning" in address and "Group by" in printed.stdout
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM),
                args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            )
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(address)
            page.get_by_text("study-breastmnist-smoke").first.wait_for(timeout=60_000)
            body = page.inner_text("body")
            assert "BreastMNIST (28x28 breast ultrasound)" in body  # the experiment's description, on the runs table
            page.get_by_text("Expand rows").first.wait_for()
            page.get_by_role("button", name="Columns").click()  # the tour's first step: add a metric column
            page.get_by_placeholder("Search columns").fill("test_auroc")
            page.get_by_text("test_auroc", exact=True).first.click()
            page.keyboard.press("Escape")
            page.get_by_role("columnheader", name="test_auroc").first.wait_for(timeout=30_000)
            study_row = page.get_by_role("row").filter(has_text="study-breastmnist-smoke").first
            study_row.locator('button[data-component-id*="runnamecellrenderer"]').click()  # expand the study
            page.get_by_text("baseline-smallcnn-all-s0").first.wait_for(timeout=60_000)
            page.get_by_text("breastmnist-train").first.wait_for(timeout=60_000)  # the Dataset column of a step
            page.screenshot(path=str(tmp_path / "runs.png"))
            browser.close()


def test_grid_parents_carry_curves_over_label_fractions_and_a_description(smoke_store):
    uri, _ = smoke_store
    client = MlflowClient()
    runs = all_runs(uri)
    (probe,) = [r for r in runs if r.data.tags.get("stage") == "linear_probe" and "kind" not in r.data.tags]
    fractions = sorted(
        {float(r.data.tags["label_fraction"]) for r in runs if r.data.tags.get("mlflow.parentRunId") == probe.info.run_id and r.data.tags.get("method") == "ssl_probe"}
    )
    history = client.get_metric_history(probe.info.run_id, "label_efficiency/ssl_probe_test_auroc_mean")
    assert [h.step for h in history] == [round(f * 100) for f in fractions]
    assert not [k for k in probe.data.metrics if "/f0" in k]
    assert "SSL linear probe" in probe.data.tags["mlflow.note.content"] and "selected_run_id" in probe.data.tags["mlflow.note.content"]
    (parent,) = [r for r in runs if r.data.tags.get("stage") == "study"]
    description = parent.data.tags["mlflow.note.content"]
    assert "## Steps" in description and f"/runs/{probe.info.run_id})" in description
    assert "paired" in description.lower()
