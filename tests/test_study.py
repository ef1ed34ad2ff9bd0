"""`study`: every step a nested FINISHED run, tables written, finished steps reused, and an
interrupted study completed without duplicating what had finished."""

import shutil

import mlflow
import pytest
from mlflow import MlflowClient

from entrypoints import compare, study
from entrypoints.common import main
import pipeline.study
from pipeline import config, tracking
from pipeline.data import fingerprint
from pipeline.study import Step, plan, run_step
from pipeline.synthetic import write_synthetic
from tests.conftest import all_runs

STEPS = ["eda", "baseline_0_smallcnn_all", "baseline_1_resnet18_head", "augment_ablation", "ssl_pretrain_simclr_s0", "ssl_pretrain_simclr_s1",
         "linear_probe_simclr", "ssl_finetune_simclr", "calibrate", "thresholds", "robustness", "compare"]


@pytest.fixture()
def study_env(synthetic_root, tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    return ["--dataset", "breastmnist", "--profile", "smoke", "--out", str(tmp_path / "reports")]


def top_level(runs, stage):
    return [r for r in runs if r.data.tags.get("stage") == stage and "study_step" in r.data.tags]


def test_plans_follow_the_profiles():
    assert [s.name for s in plan(config.load_profile("smoke"))] == STEPS
    quick = [s.name for s in plan(config.load_profile("quick"))]
    assert quick.index("eda") < quick.index("augment_ablation") < quick.index("ssl_pretrain_moco_s0") < quick.index("compare")
    assert "baseline_2_resnet18_head" in quick and "linear_probe_moco" in quick and "ssl_finetune_moco" in quick
    probes = {s.name: s.overrides for s in plan(config.load_profile("quick")) if s.stage == "linear_probe"}
    assert probes == {"linear_probe_simclr": {}, "linear_probe_moco": {"methods": ["ssl_probe"]}}
    paper = {s.name: s for s in plan(config.load_profile("paper"))}
    pretraining = [s for s in paper.values() if s.stage == "ssl_pretrain"]
    assert len(pretraining) == 6 and {s.overrides["seed"] for s in pretraining} == {0, 1, 2}  # 2 methods x 3 pretraining seeds
    assert paper["linear_probe_moco"].needs == {"ssl_run_id": ["ssl_pretrain_moco_s0", "ssl_pretrain_moco_s1", "ssl_pretrain_moco_s2"]}
    assert paper["ssl_finetune_simclr"].needs == {"ssl_run_id": ["ssl_pretrain_simclr_s0", "ssl_pretrain_simclr_s1", "ssl_pretrain_simclr_s2"]}
    for stage in ("linear_probe", "ssl_finetune"):
        assert len(config.resolve(stage, "breastmnist", {}, profile="paper")["seeds"]) >= 5


def test_study_runs_every_step_nested_then_reuses_them(smoke_store, synthetic_root, tmp_path, monkeypatch, capsys):
    uri, folder = smoke_store
    runs = all_runs(uri)
    (parent,) = [r for r in runs if r.data.tags["stage"] == "study"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["steps_ran"] == len(STEPS) - 1  # the head baseline: skipped
    steps = {r.data.tags["study_step"]: r for r in runs if "study_step" in r.data.tags}
    assert set(steps) == set(STEPS) - {"baseline_1_resnet18_head"}
    for run in steps.values():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert steps["calibrate"].data.tags["source_run_id"] == steps["baseline_0_smallcnn_all"].info.run_id
    encoders = [steps[f"ssl_pretrain_simclr_s{seed}"] for seed in (0, 1)]
    assert [r.data.params["cfg.seed"] for r in encoders] == ["0", "1"]
    for name in ("linear_probe_simclr", "ssl_finetune_simclr"):
        assert steps[name].data.tags["source_run_id"] == ",".join(r.info.run_id for r in encoders)
    reports = folder / "reports" / "breastmnist"
    weights_file = "resnet18-f37072fd.pth"  # skipped offline: the table and the draft say why and which file to place
    for text in ((reports / "week2_baselines.md").read_text(), (reports / "draft.md").read_text()):
        assert "**not run**: study step `baseline_1_resnet18_head`: ImageNet weights for resnet18 are not available offline" in text
        assert weights_file in text
    for name in ("week2_baselines", "week3_augment_ablation", "week4_ssl_pretraining", "week5_label_efficiency", "week6_probe_vs_finetune",
                 "week6_paired_differences", "week6_calibration", "week6_calibration_change", "week7_thresholds", "week8_robustness"):
        assert "missing" not in (reports / f"{name}.md").read_text(), name
    for tex in reports.glob("*.tex"):  # ASCII, so any LaTeX engine and input encoding compiles it
        assert tex.read_text().isascii(), tex.name
    methods = (reports / "draft.md").read_text().split("## Results")[0]
    for fragment in ("Augmentation ablation:", "Self-supervised pretraining:", "Label efficiency:", "SSL fine-tuning:",
                     "temperature scaling fitted on the validation predictions", "Decision thresholds for run",
                     "Robustness of run"):
        assert fragment in methods, fragment

    # the study again in a copy of that store (runs added to the copy only), after a student's own
    # pretraining: finished steps are reused, and the study's tables keep to the study's runs
    shutil.copy(folder / "mlflow.db", tmp_path / "mlflow.db")
    copy = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", copy)
    mlflow.set_tracking_uri(copy)
    client = MlflowClient()
    own = client.create_run(parent.info.experiment_id, tags={"dataset": "breastmnist", "stage": "ssl_pretrain", "method": "moco"})
    client.set_terminated(own.info.run_id, "FINISHED")
    capsys.readouterr()
    main(study.command, ["--dataset", "breastmnist", "--profile", "smoke", "--out", str(tmp_path / "reports")])
    assert f"{len(STEPS) - 2} reused" in capsys.readouterr().out
    runs = all_runs(copy)
    second = [r for r in runs if r.data.tags["stage"] == "study"][0]
    assert second.data.metrics["steps_reused"] == len(STEPS) - 2 and second.data.metrics["steps_ran"] == 1
    assert len(top_level(runs, "ssl_pretrain")) == 2
    week4 = (tmp_path / "reports" / "breastmnist" / "week4_ssl_pretraining.csv").read_text()
    assert steps["ssl_pretrain_simclr_s0"].info.run_id in week4 and own.info.run_id not in week4
    main(compare.command, ["--dataset", "breastmnist", "--out", str(tmp_path / "mine")])  # compare alone: newest of each stage
    assert own.info.run_id in (tmp_path / "mine" / "breastmnist" / "week4_ssl_pretraining.csv").read_text()


def test_interrupted_study_completes_without_duplicates(study_env, tracking_uri, monkeypatch):
    real = study.run_linear_probe

    def interrupted(cfg, data_root=""):
        raise KeyboardInterrupt("simulated Ctrl-C")

    monkeypatch.setattr(study, "run_linear_probe", interrupted)  # the entry point wires each stage's call
    with pytest.raises(SystemExit) as exit_info:
        main(study.command, study_env)
    assert exit_info.value.code == 130
    (killed,) = [r for r in all_runs(tracking_uri) if r.data.tags["stage"] == "study"]
    assert killed.info.status == "KILLED"
    monkeypatch.setattr(study, "run_linear_probe", real)

    main(study.command, study_env)
    runs = all_runs(tracking_uri)
    finished = [r for r in runs if r.data.tags["stage"] == "study" and r.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.metrics["steps_reused"] == 5  # eda, baseline, ablation, 2 x ssl (head baseline: skipped)
    for stage in ("eda", "baseline", "augment_ablation", "linear_probe"):
        assert len(top_level(runs, stage)) == 1, stage
    assert len(top_level(runs, "ssl_pretrain")) == 2
    assert all(r.info.status != "RUNNING" for r in runs)


def test_a_step_is_reused_only_with_the_same_config_inputs_data_and_code(synthetic_root, tracking_uri, tmp_path, monkeypatch):
    other_data = tmp_path / "other-data"
    write_synthetic(other_data, "breastmnist", seed=7)  # same name and shapes, other images
    calls = []

    def runner(cfg, data_root, inputs):
        calls.append(cfg["epochs"])
        with tracking.tracked_run("eda", "breastmnist", {"model": "-", "seed": "-"}, nested=True):
            tracking.log_config(cfg)

    step = Step("eda", "eda")
    client = MlflowClient()
    a, b = (client.create_run("0", tags={"dataset": "breastmnist", "stage": "baseline"}).info.run_id for _ in "ab")
    with tracking.tracked_run("study", "breastmnist", {"model": "-", "seed": "-"}) as parent:
        def status(cfg, inputs, root=str(synthetic_root)):
            inputs = {k: {"a": a, "b": b}[v] for k, v in inputs.items()}
            return run_step(step, cfg, inputs, root, runner, "breastmnist", parent.info.run_id).status

        assert status({"epochs": 1}, {"run_id": "a"}) == "ran"
        assert status({"epochs": 1}, {"run_id": "a"}) == "reused"
        assert status({"epochs": 2}, {"run_id": "a"}) == "ran"  # another config
        assert status({"epochs": 1}, {"run_id": "b"}) == "ran"  # another input run (e.g. a newer baseline)
        assert status({"epochs": 1}, {"run_id": "a"}, str(other_data)) == "ran"  # another data file
        assert status({"epochs": 1}, {"run_id": "a"}, str(other_data)) == "reused"
        monkeypatch.setattr(tracking, "code_version", lambda: "changed-code")
        assert status({"epochs": 1}, {"run_id": "a"}) == "ran"  # the code changed since
        assert status({"epochs": 1}, {"run_id": "a"}) == "reused"
        newest = all_runs(tracking_uri)[0]
        shutil.rmtree(newest.info.artifact_uri)  # its files deleted (e.g. mlruns/ removed by hand)
        assert status({"epochs": 1}, {"run_id": "a"}) == "ran"
    assert calls == [1, 2, 1, 1, 1, 1]
    md5s = {r.data.tags.get("data_md5") for r in all_runs(tracking_uri) if r.data.tags["stage"] == "eda"}
    assert md5s == {fingerprint("breastmnist", 28, str(synthetic_root)), fingerprint("breastmnist", 28, str(other_data))}


def test_a_probe_step_without_imagenet_weights_reruns_once_they_are_there(synthetic_root, tracking_uri, monkeypatch):
    weights = [False]
    monkeypatch.setattr(pipeline.study, "imagenet_weights_cached", lambda: weights[0])

    def runner(cfg, data_root, inputs):
        with tracking.tracked_run("linear_probe", "breastmnist", {"model": "-", "seed": "-"}, nested=True):
            tracking.log_config(cfg)
            if not weights[0]:
                tracking.set_tags({"imagenet_probe_status": "not run: no weights"})

    step = Step("linear_probe_simclr", "linear_probe")
    cfg = {"methods": ["ssl_probe", "imagenet_probe"]}
    with tracking.tracked_run("study", "breastmnist", {"model": "-", "seed": "-"}) as parent:
        def status():
            return run_step(step, cfg, {}, str(synthetic_root), runner, "breastmnist", parent.info.run_id).status

        assert [status(), status()] == ["ran", "reused"]  # still no weights: the probe-less run stands
        weights[0] = True
        assert [status(), status()] == ["ran", "reused"]  # weights placed: the ImageNet probe is fitted once


def test_a_bad_profile_value_stops_the_study_before_any_step(tracking_uri, monkeypatch, capsys):
    smoke = config.load_profile("smoke")
    broken = {**smoke, "ssl_finetune": {**smoke.get("ssl_finetune", {}), "label_fractions": [1.5]}}
    monkeypatch.setattr(config, "load_profile", lambda name: broken)
    with pytest.raises(SystemExit) as exit_info:
        main(study.command, ["--dataset", "breastmnist", "--profile", "smoke"])
    assert exit_info.value.code == 2 and "label_fractions=[1.5] must be" in capsys.readouterr().err
    assert all_runs(tracking_uri) == []  # the last-but-four step's mistake cost no training


def test_a_step_that_reads_an_encoders_size_fingerprints_that_file(tracking_uri, tmp_path):
    root = tmp_path / "only-64"
    write_synthetic(root, "breastmnist", size=64)  # no 28-px file: the step must not ask for one
    client = MlflowClient()
    encoder = client.create_run("0", tags={"dataset": "breastmnist", "stage": "ssl_pretrain"})
    client.log_param(encoder.info.run_id, "cfg.size", "64")

    def runner(cfg, data_root, inputs):
        with tracking.tracked_run("linear_probe", "breastmnist", {"model": "-", "seed": "-"}, nested=True):
            pass

    step = Step("linear_probe_simclr", "linear_probe")
    with tracking.tracked_run("study", "breastmnist", {"model": "-", "seed": "-"}) as parent:
        outcome = run_step(step, {"ssl_run_id": encoder.info.run_id, "methods": ["ssl_probe"]}, {}, str(root), runner,
                           "breastmnist", parent.info.run_id)
    assert outcome.status == "ran"
    assert mlflow.get_run(outcome.run_id).data.tags["data_md5"] == fingerprint("breastmnist", 64, str(root))
