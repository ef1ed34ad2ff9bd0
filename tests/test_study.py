"""`study`: every step a nested FINISHED run, tables written, finished steps reused, and an
interrupted study completed without duplicating what had finished."""

import json
import math
import shutil

import mlflow
import pytest
from mlflow import MlflowClient

from entrypoints import compare, study
from entrypoints.common import main
import pipeline.steps.study
from pipeline import config, tracking
from pipeline.tracking import lifecycle
from pipeline.data import fingerprint
from pipeline.errors import UserError
from pipeline.steps.finetune_table import run_finetune_table
from pipeline.source import best_selected_run
from pipeline.steps.study import Step, plan, run_step, run_study, starting_point
from pipeline.synthetic import write_synthetic
from tests.conftest import all_runs

STEPS = [
    "eda",
    "baseline_0_smallcnn_all",
    "baseline_1_resnet18_head",
    "baseline_2_resnet18_all",
    "finetune_table",
    "augment_ablation",
    "ssl_pretrain_simclr_s0",
    "ssl_pretrain_simclr_s1",
    "linear_probe_simclr",
    "ssl_finetune_simclr",
    "calibrate_ssl",
    "thresholds_ssl",
    "calibrate",
    "thresholds",
    "robustness",
    "compare",
]
SKIPPED = {"baseline_1_resnet18_head", "baseline_2_resnet18_all", "finetune_table"}  # offline: no ImageNet weights
OFFLINE = "ImageNet weights for resnet18 are not available offline"


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


@pytest.mark.parametrize(
    "profile, head, full",
    [
        ("smoke", "baseline_1_resnet18_head", "baseline_2_resnet18_all"),
        ("quick", "baseline_2_resnet18_head", "baseline_3_resnet18_all"),  # not baseline_1: it starts from random weights
        ("paper", "baseline_1_resnet18_head", "baseline_2_resnet18_all"),
        ("full", "baseline_2_resnet18_head", "baseline_3_resnet18_all"),  # not baseline_1: random weights, cifar stem
    ],
)
def test_every_profile_tabulates_head_only_against_full_fine_tuning_from_the_same_start(profile, head, full):
    steps = {s.name: s for s in plan(config.load_profile(profile))}
    names = list(steps)
    table = steps["finetune_table"]
    assert table.needs == {"head_run_id": [head], "all_run_id": [full]} and table.optional
    assert starting_point(steps[head].overrides) == starting_point(steps[full].overrides) == ("resnet18", "imagenet", "imagenet")
    assert steps[head].optional and steps[full].optional  # both need ImageNet weights: skipped offline, the table with them
    assert max(names.index(head), names.index(full)) < names.index("finetune_table") < names.index("augment_ablation")


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper", "full"])
def test_every_profile_calibrates_and_thresholds_the_best_ssl_fine_tuned_model_and_the_first_baseline(profile):
    steps = {s.name: s for s in plan(config.load_profile(profile))}
    names = list(steps)
    grids = [name for name, s in steps.items() if s.stage == "ssl_finetune"]
    assert grids == [f"ssl_finetune_{m}" for m in config.load_profile(profile)["study"]["ssl_methods"]]
    for stage in ("calibrate", "thresholds"):
        ssl = steps[f"{stage}_ssl"]
        assert (ssl.stage, ssl.needs, ssl.best_selected, ssl.tags) == (stage, {"run_id": grids}, True, {"analysed": "ssl_finetune"})
        # before the baseline's, so compare (the newest calibrate/thresholds run of the study) still cites the baseline
        assert names.index(grids[-1]) < names.index(f"{stage}_ssl") < names.index("calibrate")
    for stage in ("calibrate", "thresholds", "robustness"):
        assert steps[stage].needs == {"run_id": ["baseline_0_smallcnn_all"]} and steps[stage].tags == {"analysed": "baseline"}
        assert not steps[stage].best_selected
    assert "robustness_ssl" not in steps


def test_the_finetune_table_needs_both_modes_and_prefers_the_same_start():
    def table_needs(baselines):
        return next((s.needs for s in plan({"study": {"baselines": baselines}}) if s.stage == "finetune_table"), None)

    head = {"model": "resnet18", "stem": "imagenet", "finetune": "head"}
    assert table_needs([{"model": "smallcnn"}, head]) is None  # no ResNet-18 full fine-tuning: no table
    assert table_needs([{"model": "smallcnn"}, {"model": "resnet18", "finetune": "all"}]) is None  # no head-only baseline
    scratch, same = {"model": "resnet18", "stem": "imagenet"}, {"model": "resnet18", "stem": "imagenet", "weights": "imagenet"}
    assert table_needs([scratch, head, same]) == {"head_run_id": ["baseline_1_resnet18_head"], "all_run_id": ["baseline_2_resnet18_all"]}
    # no full fine-tuning from the same start: the first one, and the table says the starts differ
    assert table_needs([scratch, head]) == {"head_run_id": ["baseline_1_resnet18_head"], "all_run_id": ["baseline_0_resnet18_all"]}


def test_study_runs_every_step_nested_then_reuses_them(smoke_store, synthetic_root, tmp_path, monkeypatch, capsys):
    uri, folder = smoke_store
    runs = all_runs(uri)
    (parent,) = [r for r in runs if r.data.tags["stage"] == "study"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["steps_ran"] == len(STEPS) - len(SKIPPED)
    steps = {r.data.tags["study_step"]: r for r in runs if "study_step" in r.data.tags}
    assert set(steps) == set(STEPS) - SKIPPED
    for run in steps.values():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # the table's inputs were skipped (no ImageNet weights offline): it is skipped with their reason, the study goes on
    step_log = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/study_steps.md")
    (line,) = [row for row in step_log.splitlines() if row.startswith("| finetune_table |")]
    assert "| skipped | — |" in line and f"needs step baseline_1_resnet18_head, which was skipped: {OFFLINE}" in line
    assert not top_level(runs, "finetune_table")
    for name in ("calibrate", "thresholds", "robustness"):  # the first baseline
        assert steps[name].data.tags["source_run_id"] == steps["baseline_0_smallcnn_all"].info.run_id
        assert steps[name].data.tags["analysed"] == "baseline"
    grid = steps["ssl_finetune_simclr"]  # the best SSL fine-tuned model: its grid's child with the best validation AUROC
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == grid.info.run_id and "best_val_auroc" in r.data.metrics}
    selected = grid.data.tags["selected_run_id"]
    assert len(children) == 2 and children[selected].data.metrics["best_val_auroc"] == max(r.data.metrics["best_val_auroc"] for r in children.values())
    for name in ("calibrate_ssl", "thresholds_ssl"):
        assert steps[name].data.tags["source_run_id"] == selected and steps[name].data.tags["analysed"] == "ssl_finetune"
    encoders = [steps[f"ssl_pretrain_simclr_s{seed}"] for seed in (0, 1)]
    assert [r.data.params["cfg.seed"] for r in encoders] == ["0", "1"]
    for name in ("linear_probe_simclr", "ssl_finetune_simclr"):
        assert steps[name].data.tags["source_run_id"] == ",".join(r.info.run_id for r in encoders)
    reports = folder / "reports" / "breastmnist"
    for name, step in (("week6_calibration", "calibrate"), ("week7_thresholds", "thresholds")):  # the baseline's analysis, then the SSL model's
        text = (reports / f"{name}.md").read_text()
        baseline_cited = f"baseline: run {steps[step].info.run_id[:8]}, source {steps['baseline_0_smallcnn_all'].info.run_id[:8]}"
        ssl_cited = f"SSL fine-tune: run {steps[step + '_ssl'].info.run_id[:8]}, source {selected[:8]}"
        assert baseline_cited in text and ssl_cited in text, name
        assert "\n| baseline | " in text and "\n| SSL fine-tune | " in text, name
    weights_file = "resnet18-f37072fd.pth"  # skipped offline: the table and the draft say why and which file to place
    for text in ((reports / "week2_baselines.md").read_text(), (reports / "draft.md").read_text()):
        assert "**not run**: study step `baseline_1_resnet18_head`: ImageNet weights for resnet18 are not available offline" in text
        assert weights_file in text
    for name in (
        "week2_baselines",
        "week3_augment_ablation",
        "week4_ssl_pretraining",
        "week5_label_efficiency",
        "week6_probe_vs_finetune",
        "week6_paired_differences",
        "week6_calibration",
        "week6_calibration_change",
        "week7_thresholds",
        "week8_robustness",
    ):
        assert "missing" not in (reports / f"{name}.md").read_text(), name
    for tex in reports.glob("*.tex"):  # ASCII, so any LaTeX engine and input encoding compiles it
        assert tex.read_text().isascii(), tex.name
    methods = (reports / "draft.md").read_text().split("## Results")[0]
    for fragment in (
        "Augmentation ablation:",
        "Self-supervised pretraining:",
        "Label efficiency:",
        "SSL fine-tuning:",
        "temperature scaling fitted on the validation predictions",
        "Decision thresholds for run",
        "Robustness of run",
    ):
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
    assert f"{len(STEPS) - len(SKIPPED) - 1} reused" in capsys.readouterr().out
    runs = all_runs(copy)
    second = [r for r in runs if r.data.tags["stage"] == "study"][0]
    assert second.data.metrics["steps_reused"] == len(STEPS) - len(SKIPPED) - 1 and second.data.metrics["steps_ran"] == 1  # compare
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
    with tracking.tracked_run("study", "breastmnist", {"model": "-", "seed": "-"}) as parent_id:

        def status(cfg, inputs, root=str(synthetic_root)):
            inputs = {k: {"a": a, "b": b}[v] for k, v in inputs.items()}
            return run_step(step, cfg, inputs, root, runner, "breastmnist", parent_id).status

        assert status({"epochs": 1}, {"run_id": "a"}) == "ran"
        assert status({"epochs": 1}, {"run_id": "a"}) == "reused"
        assert status({"epochs": 2}, {"run_id": "a"}) == "ran"  # another config
        assert status({"epochs": 1}, {"run_id": "b"}) == "ran"  # another input run (e.g. a newer baseline)
        assert status({"epochs": 1}, {"run_id": "a"}, str(other_data)) == "ran"  # another data file
        assert status({"epochs": 1}, {"run_id": "a"}, str(other_data)) == "reused"
        for module in (tracking, lifecycle):  # what the study looks for, and what a run is tagged with
            monkeypatch.setattr(module, "code_version", lambda: "changed-code")
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
    monkeypatch.setattr(pipeline.steps.study, "imagenet_weights_cached", lambda: weights[0])

    def runner(cfg, data_root, inputs):
        with tracking.tracked_run("linear_probe", "breastmnist", {"model": "-", "seed": "-"}, nested=True):
            tracking.log_config(cfg)
            if not weights[0]:
                tracking.set_tags({"imagenet_probe_status": "not run: no weights"})

    step = Step("linear_probe_simclr", "linear_probe")
    cfg = {"methods": ["ssl_probe", "imagenet_probe"]}
    with tracking.tracked_run("study", "breastmnist", {"model": "-", "seed": "-"}) as parent_id:

        def status():
            return run_step(step, cfg, {}, str(synthetic_root), runner, "breastmnist", parent_id).status

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
    with tracking.tracked_run("study", "breastmnist", {"model": "-", "seed": "-"}) as parent_id:
        outcome = run_step(step, {"ssl_run_id": encoder.info.run_id, "methods": ["ssl_probe"]}, {}, str(root), runner, "breastmnist", parent_id)
    assert outcome.status == "ran"
    assert mlflow.get_run(outcome.run_id).data.tags["data_md5"] == fingerprint("breastmnist", 64, str(root))


FAKE_BASELINES = [
    {"model": "smallcnn"},
    {"model": "resnet18", "stem": "imagenet", "finetune": "head"},
    {"model": "resnet18", "stem": "imagenet", "finetune": "all", "weights": "imagenet"},
]
# per SSL method, the best_val_auroc and test_auroc of each child: moco's best validation AUROC wins, simclr's test would
GRID_AUROCS = {"simclr": [(0.70, 0.99), (0.80, 0.95)], "moco": [(0.90, 0.60), (0.85, 0.70)]}


def fake_runners(weights: bool, calls: dict):
    """Stand-ins for every stage that log just what the study and the real finetune_table read."""

    def stage_run(stage, tags=None):
        return tracking.tracked_run(stage, "breastmnist", {"model": "-", "seed": "-", **(tags or {})})

    def plain(stage):
        def runner(cfg, root, ids):
            calls.setdefault(stage, []).append((cfg, ids))
            with stage_run(stage, {"source_run_id": ids["run_id"]} if "run_id" in ids else {}):
                tracking.log_config({k: v for k, v in cfg.items() if k != "not_run"})

        return runner

    def baseline(cfg, root, ids):
        if cfg["weights"] == "imagenet" and not weights:
            raise UserError(f"{OFFLINE} (URLError): place the file")
        with stage_run("baseline", {"model": cfg["model"], "finetune": cfg["finetune"], "kind": "classifier"}):
            tracking.log_config(cfg)
            tracking.log_metrics({"best_epoch": 1, "best_val_auroc": 0.7, "test_auroc": 0.6, "test_acc": 0.6, "test_ece": 0.1})
            tracking.log_text(json.dumps({"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "val_auroc": 0.7}) + "\n", "val_log.jsonl")

    def ssl_finetune(cfg, root, ids):
        method = tracking.get_run(cfg["ssl_run_id"]).config["method"]
        with stage_run("ssl_finetune", {"ssl_method": method}):
            tracking.log_config(cfg)
            children = []
            for val, test in GRID_AUROCS[method]:
                with stage_run("ssl_finetune", {"ssl_method": method, "kind": "classifier"}) as child_id:
                    tracking.log_metrics({"best_val_auroc": val, "test_auroc": test})
                children.append((val, test, child_id))
            val, test, best = max(children)
            tracking.set_tags({"selected_run_id": best})
            tracking.log_metrics({"selected_best_val_auroc": val, "selected_test_auroc": test})
        calls.setdefault("grid_children", {})[method] = children

    runners = {stage: plain(stage) for stage in ("eda", "augment_ablation", "ssl_pretrain", "linear_probe", "calibrate", "thresholds", "robustness", "compare")}
    return {**runners, "baseline": baseline, "ssl_finetune": ssl_finetune, "finetune_table": lambda cfg, root, ids: run_finetune_table(cfg)}


@pytest.fixture()
def fake_study(synthetic_root, tracking_uri, tmp_path, monkeypatch):
    """Run a study of fake runners (seconds, not minutes) over a profile with these baselines."""
    smoke = config.load_profile("smoke")

    def run(weights, baselines=FAKE_BASELINES):
        profile = {**smoke, "study": {"baselines": baselines, "ssl_methods": ["simclr", "moco"], "pretraining_seeds": [0]}}
        monkeypatch.setattr(config, "load_profile", lambda name: profile)
        calls = {}
        outcomes = run_study("breastmnist", "smoke", fake_runners(weights, calls), str(synthetic_root), str(tmp_path / "reports"), echo=lambda line: None)
        return {o.step: o for o in outcomes}, calls

    return run


def test_the_study_tabulates_head_only_against_full_fine_tuning_when_both_ran(fake_study):
    outcomes, _ = fake_study(weights=True)
    assert outcomes["finetune_table"].status == "ran"
    table = mlflow.get_run(outcomes["finetune_table"].run_id)
    assert table.data.tags["head_run_id"] == outcomes["baseline_1_resnet18_head"].run_id
    assert table.data.tags["all_run_id"] == outcomes["baseline_2_resnet18_all"].run_id
    markdown = mlflow.artifacts.load_text(f"runs:/{table.info.run_id}/finetune_table.md")
    assert "Same start: both runs begin from resnet18 with ImageNet weights and the imagenet stem" in markdown


def test_a_step_whose_input_was_skipped_is_skipped_with_that_reason(fake_study, tracking_uri):
    outcomes, calls = fake_study(weights=False)
    table = outcomes["finetune_table"]
    reason = f"which was skipped: {OFFLINE} (URLError): place the file"
    assert (table.status, table.run_id) == ("skipped", "")
    assert table.note == f"needs step baseline_1_resnet18_head, {reason}; needs step baseline_2_resnet18_all, {reason}"
    assert not [r for r in all_runs(tracking_uri) if r.data.tags["stage"] == "finetune_table"]
    ((compare_cfg, _),) = calls["compare"]  # the tables and the draft say why
    assert compare_cfg["not_run"]["finetune_table"] == ("finetune_table", table.note)
    assert outcomes["compare"].status == "ran"


def test_a_required_step_whose_input_was_skipped_stops_the_study(fake_study, tracking_uri):
    with pytest.raises(UserError, match=f"^study step calibrate needs step baseline_0_resnet18_head, which was skipped: {OFFLINE}"):
        fake_study(weights=False, baselines=[FAKE_BASELINES[1]])  # the analysed baseline needs ImageNet weights
    (study_run,) = [r for r in all_runs(tracking_uri) if r.data.tags["stage"] == "study"]
    assert study_run.info.status == "FAILED"


def test_the_ssl_analyses_take_the_best_validation_auroc_across_the_fine_tuning_grids(fake_study):
    outcomes, calls = fake_study(weights=False)
    children = calls["grid_children"]
    best = max(children["moco"])[2]  # moco's best child: the highest validation AUROC of both grids (simclr's tests higher)
    assert max(max(children["simclr"]), max(children["moco"]))[2] == best
    for stage in ("calibrate", "thresholds"):
        ssl, baseline = calls[stage]  # the SSL model's step runs first
        assert ssl[1] == {"run_id": best} and baseline[1] == {"run_id": outcomes["baseline_0_smallcnn_all"].run_id}
        assert mlflow.get_run(outcomes[f"{stage}_ssl"].run_id).data.tags["analysed"] == "ssl_finetune"
        assert mlflow.get_run(outcomes[stage].run_id).data.tags["analysed"] == "baseline"


def test_the_best_selection_reads_validation_auroc_only(tracking_uri):
    client = MlflowClient()

    def grid(selected, val, test):
        run = client.create_run("0", tags={"dataset": "breastmnist", "stage": "ssl_finetune", **({"selected_run_id": selected} if selected else {})})
        for key, value in (("selected_best_val_auroc", val), ("selected_test_auroc", test)):
            if value is not None:
                client.log_metric(run.info.run_id, key, value)
        return run.info.run_id

    grids = [grid("a", 0.8, 0.99), grid("b", 0.9, 0.5), grid("c", 0.9, 0.7), grid("", 0.95, 0.9), grid("d", math.nan, 0.9)]
    assert best_selected_run(grids) == "b"  # c ties on validation: the grid listed first; d has no validation AUROC
    with pytest.raises(UserError, match="selected a child with a validation AUROC"):
        best_selected_run(grids[3:])
