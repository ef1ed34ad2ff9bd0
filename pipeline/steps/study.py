"""Week 10: the whole study for one dataset in one command, each step a nested run of a `study` run.

Order: eda → baselines → head-only vs. full fine-tuning table (when the profile trains both on
ResNet-18) → augment ablation → SSL pretraining (each method × pretraining seed) → linear probe (each
method) → SSL fine-tune (each method) → calibrate and thresholds of the best SSL fine-tuned model →
calibrate → thresholds → robustness of the first baseline → compare. A probe or fine-tune step takes
every pretraining run of its method, one per pretraining seed, so its SSL rows count pretraining
variance. A step that needs a skipped step (a baseline without ImageNet weights) is skipped too, with
the reason, when it is optional, and stops the study when it is not. A step's configuration (its
resolved config, the run ids it consumes and the MD5 of the data file it reads) is hashed; a FINISHED
step run with the same hash and code version is reused instead of recomputed, so an interrupted study
continues where it stopped and a repeated one finishes in seconds. Steps run in this process: the
data stay loaded, and no interpreter start-up is paid per step.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pipeline import config, tables, tracking
from pipeline.data import fingerprint
from pipeline.errors import UserError
from pipeline.handin import check_export_is_new
from pipeline.models import imagenet_weights_cached
from pipeline.source import best_selected_run

Runner = Callable[[dict[str, Any], str, dict[str, str]], None]


@dataclass
class Step:
    """One step of the study: its stage, config overrides, and the steps whose run ids it takes."""

    name: str
    stage: str
    overrides: dict[str, Any] = field(default_factory=dict)
    needs: dict[str, list[str]] = field(default_factory=dict)  # input name -> the steps whose run ids it takes (comma-joined)
    optional: bool = False  # skipped, with the reason, when its runner raises a UserError or a step it needs was skipped
    best_selected: bool = False  # takes the selected child with the best validation AUROC of the grids it needs
    tags: dict[str, str] = field(default_factory=dict)  # set on its run


@dataclass
class Outcome:
    """What happened to a step: ran, reused or skipped, with its run id and wall time."""

    step: str
    stage: str
    status: str
    run_id: str
    seconds: float
    note: str = ""


ANALYSED = "analysed"  # the tag that tells a post-hoc run's classifier: the first baseline or the best SSL fine-tuned one


def starting_point(overrides: Mapping[str, Any]) -> tuple[str, str, str]:
    """A baseline's model, initial weights (`auto` resolved as the baseline resolves it) and stem."""
    resolved = config.pretrained_head({**config.stage_defaults("baseline"), **overrides})
    return resolved["model"], resolved["weights"], resolved["stem"]


def finetune_table_steps(baselines: list[Step]) -> list[Step]:
    """Week 3's head-only vs. full fine-tuning table when the baselines hold both on ResNet-18: the
    first head-only one against the full fine-tuning one with the same starting point (weights and
    stem), else the first ResNet-18 full fine-tuning one (the table then says the starts differ)."""
    resnets = [s for s in baselines if starting_point(s.overrides)[0] == "resnet18"]
    heads = [s for s in resnets if s.overrides.get("finetune") == "head"]
    fulls = [s for s in resnets if s.overrides.get("finetune", "all") == "all"]
    if not heads or not fulls:
        return []
    head = heads[0]
    full = next((s for s in fulls if starting_point(s.overrides) == starting_point(head.overrides)), fulls[0])
    return [Step("finetune_table", "finetune_table", needs={"head_run_id": [head.name], "all_run_id": [full.name]}, optional=True)]


def plan(profile: Mapping[str, Any]) -> list[Step]:
    """The study's steps from a profile's `study` section: baselines (the first is the one weeks 6–8
    analyse, trained with `analysed_dropout` when given), SSL methods and pretraining seeds."""
    spec = profile.get("study", {})
    baselines = [
        Step(
            f"baseline_{i}_{b.get('model', 'default')}_{b.get('finetune', 'all')}",
            "baseline",
            dict(b),
            optional=b.get("weights") == "imagenet" or b.get("finetune") == "head",
        )
        for i, b in enumerate(spec.get("baselines", [{}]))
    ]
    if "analysed_dropout" in spec:  # week 8's MC dropout samples the dropout the analysed model trained with
        baselines[0].overrides.setdefault("dropout", spec["analysed_dropout"])
    methods = spec.get("ssl_methods", ["simclr"])
    seeds = spec.get("pretraining_seeds", [0])
    pretraining = {m: [f"ssl_pretrain_{m}_s{seed}" for seed in seeds] for m in methods}
    analysed = baselines[0].name
    finetunes = [f"ssl_finetune_{m}" for m in methods]
    return [
        Step("eda", "eda"),
        *baselines,
        *finetune_table_steps(baselines),
        Step("augment_ablation", "augment_ablation"),
        *[Step(f"ssl_pretrain_{m}_s{seed}", "ssl_pretrain", {"method": m, "seed": seed}) for m in methods for seed in seeds],
        # The supervised-only and control rows do not depend on the SSL method: only the first probe trains them.
        *[Step(f"linear_probe_{m}", "linear_probe", {} if i == 0 else {"methods": ["ssl_probe"]}, needs={"ssl_run_id": pretraining[m]}) for i, m in enumerate(methods)],
        *[Step(f"ssl_finetune_{m}", "ssl_finetune", needs={"ssl_run_id": pretraining[m]}) for m in methods],
        # the tag `analysed` tells these runs from the baseline's in compare's tables
        *[Step(f"{stage}_ssl", stage, needs={"run_id": finetunes}, best_selected=True, tags={ANALYSED: "ssl_finetune"}) for stage in ("calibrate", "thresholds")],
        *[Step(stage, stage, needs={"run_id": [analysed]}, tags={ANALYSED: "baseline"}) for stage in ("calibrate", "thresholds", "robustness")],
        Step("compare", "compare"),
    ]


def step_config(
    step: Step, dataset: str, profile_name: str, run_ids: Mapping[str, str], out_root: str, export: tuple[str, str] = ("", "results")
) -> tuple[dict[str, Any], dict[str, str]]:
    """The resolved config of a step and the run ids it consumes (config keys go into the config)."""
    inputs = {}
    for key, sources in step.needs.items():
        for source in sources:
            if source not in run_ids:
                raise UserError(f"study step {step.name} needs step {source}, which produced no run")
        inputs[key] = ",".join(run_ids[source] for source in sources)
    if step.stage == "compare":  # the study's tables cite this study's steps, not newer runs of their stages
        return {"dataset": dataset, "out_root": out_root, "export_name": export[0], "results_root": export[1]}, dict(run_ids)
    defaults = config.stage_defaults(step.stage)
    in_config = {k: v for k, v in inputs.items() if k in defaults}
    cfg = config.resolve(step.stage, dataset, {**step.overrides, **in_config}, profile=profile_name)
    return cfg, {k: v for k, v in inputs.items() if k not in defaults}


def skipped_inputs(step: Step, skipped: Mapping[str, str]) -> str:
    """Why a step cannot run: the steps it needs that were skipped, and why ("" when none was).
    For a step that is not optional, that is a UserError."""
    reasons = [f"needs step {source}, which was skipped: {skipped[source]}" for sources in step.needs.values() for source in sources if source in skipped]
    if reasons and not step.optional:
        raise UserError(f"study step {step.name} {reasons[0]}")
    return "; ".join(reasons)


def consumed_inputs(step: Step, inputs: dict[str, str]) -> dict[str, str]:
    """The run ids a step consumes: for a step on the best SSL fine-tuned model, the selected child
    with the best validation AUROC of the grids it needs (never test)."""
    if not step.best_selected:
        return inputs
    return {key: best_selected_run(ids.split(",")) for key, ids in inputs.items()}


def step_run_id(opened: list[tuple[str, str]], study_run_id: str, stage: str) -> str:
    """The id of the run a step opened directly under the study run (the last, if it opened several)."""
    mine = [run_id for run_id, parent in opened if parent == study_run_id]
    if not mine:
        raise UserError(f"study step {stage} finished without opening a run")
    return mine[-1]


def uses_imagenet_probe(step: Step, cfg: Mapping[str, Any]) -> bool:
    """A linear-probe step that fits an ImageNet probe when the weights are available."""
    return step.stage == "linear_probe" and "imagenet_probe" in cfg.get("methods", [])


def data_size(cfg: Mapping[str, Any], inputs: Mapping[str, str]) -> int:
    """The image size a step reads: that of the checkpoint it consumes (probe, fine-tune, post-hoc
    steps), else its own."""
    source = (cfg.get("ssl_run_id") or inputs.get("run_id") or "").split(",")[0]
    if source:
        return int(tracking.get_run(source).config.get("size", 28))
    return int(cfg.get("size", 28))


def reuse_key(step: Step, cfg: Mapping[str, Any], inputs: Mapping[str, str], data_md5: str, imagenet_weights: bool) -> str:
    """What makes two runs of a step interchangeable: its resolved config, the run ids it consumes,
    the data file it reads and, for a probe step, whether it could fit the ImageNet probe."""
    extra = {"imagenet_weights": imagenet_weights} if uses_imagenet_probe(step, cfg) else {}
    return config.config_hash({**cfg, **inputs, "study_step": step.name, "data_md5": data_md5, **extra})


READS_NO_IMAGES = ("calibrate", "finetune_table", "compare")  # they read logged predictions, metrics or tables


def run_step(step: Step, cfg: dict[str, Any], inputs: dict[str, str], data_root: str, runner: Runner, dataset: str, study_run_id: str) -> Outcome:
    """Reuse a FINISHED run with the same reuse key and code version whose artifacts are still
    there, else run the step."""
    data_md5 = "" if step.stage in READS_NO_IMAGES else fingerprint(dataset, data_size(cfg, inputs), data_root)
    if step.stage != "compare":
        key = reuse_key(step, cfg, inputs, data_md5, imagenet_weights_cached())
        found = tracking.finished_runs(dataset, f"tags.study_config = '{key}' and tags.code_version = '{tracking.code_version()}'")
        reusable = [r for r in found if tracking.has_artifacts(r.id, ("config.yaml",))]  # its files not deleted
        if reusable:
            return Outcome(step.name, step.stage, "reused", reusable[0].id, 0.0)
    start = time.time()
    try:
        with tracking.runs_opened() as opened:
            runner(cfg, data_root, inputs)
    except UserError as exc:
        if not step.optional:
            raise
        return Outcome(step.name, step.stage, "skipped", "", time.time() - start, str(exc))
    run_id = step_run_id(opened, study_run_id, step.stage)
    fitted_imagenet = uses_imagenet_probe(step, cfg) and "imagenet_probe_status" not in tracking.get_run(run_id).tags
    tracking.tag_run(
        run_id,
        {"study_config": reuse_key(step, cfg, inputs, data_md5, fitted_imagenet), "study_step": step.name, **step.tags, **({"data_md5": data_md5} if data_md5 else {})},
    )
    return Outcome(step.name, step.stage, "ran", run_id, time.time() - start)


def steps_table(outcomes: list[Outcome]) -> str:
    """The study's step log as Markdown."""
    rows = [[o.step, o.stage, o.status, o.run_id[:8] or "—", f"{o.seconds:.1f}", o.note[:120]] for o in outcomes]
    return tables.rows_to_markdown(rows, ["step", "stage", "status", "run", "seconds", "note"])


def study_description(profile_name: str, outcomes: list[Outcome], out_root: str, dataset: str) -> str:
    """The study run's description: what the profile is for, its steps with links to their runs,
    and compare's headline tables (label efficiency, then the paired differences)."""
    rows = [[o.step, o.status, tracking.run_link(o.run_id, o.run_id[:8]) if o.run_id else "—", f"{o.seconds:.0f}"] for o in outcomes]
    parts = [f"**{profile_name} profile**: {profile_note(profile_name)}", "## Steps\n\n" + tables.rows_to_markdown(rows, ["step", "status", "run", "seconds"])]
    for name in ("week5_label_efficiency.md", "week6_paired_differences.md"):
        path = Path(out_root) / dataset / name
        parts.append(path.read_text() if path.is_file() else f"({name}: compare did not write it)")
    return "\n\n".join(parts) + "\n"


def profile_note(profile_name: str) -> str:
    """What a profile's numbers are for (its `note`), printed before and after a study and tagged on it."""
    return str(config.load_profile(profile_name).get("note", ""))


def run_study(
    dataset: str,
    profile_name: str,
    runners: Mapping[str, Runner],
    data_root: str = "",
    out_root: str = "reports",
    echo: Callable[[str], None] = print,
    export: tuple[str, str] = ("", "results"),
) -> list[Outcome]:
    """Run every step of the study under one parent `study` run; `runners` maps each stage to its
    pipeline call (the entry point wires them, so no step module imports another). `export`: the
    hand-in name (empty: none) and results root that compare writes the weekly folders to."""
    steps = plan(config.load_profile(profile_name))
    planned = {step.name: "planned" for step in steps}
    for step in steps:  # every profile value checked before any step runs (not after an hour of training)
        step_config(step, dataset, profile_name, planned, out_root)
    if export[0]:  # and a hand-in name already used
        check_export_is_new(Path(export[1]), export[0], dataset)
    outcomes: list[Outcome] = []
    run_ids: dict[str, str] = {}
    tags = {"model": "-", "seed": "-", "profile": profile_name}
    if note := profile_note(profile_name):
        echo(f"[study] note: {note}")
        tags["mlflow.note.content"] = f"{profile_name} profile: {note}"
    with tracking.tracked_run("study", dataset, tags, run_name=f"study-{dataset}-{profile_name}") as study_run_id:
        tracking.log_json({"profile": profile_name, "steps": [s.name for s in steps]}, "study_plan.json")
        for step in steps:
            echo(f"[study] {step.name} ...")
            skipped = {o.step: o.note for o in outcomes if o.status == "skipped"}
            if reason := skipped_inputs(step, skipped):
                outcome = Outcome(step.name, step.stage, "skipped", "", 0.0, reason)
            else:
                cfg, inputs = step_config(step, dataset, profile_name, run_ids, out_root, export)
                if step.stage == "compare":  # the tables and the draft say what the study could not run
                    cfg["not_run"] = {o.step: (o.stage, o.note) for o in outcomes if o.status == "skipped"}
                outcome = run_step(step, cfg, consumed_inputs(step, inputs), data_root, runners[step.stage], dataset, study_run_id)
            outcomes.append(outcome)
            if outcome.run_id:
                run_ids[step.name] = outcome.run_id
            echo(" ".join(filter(None, [f"[study] {step.name}: {outcome.status}", outcome.run_id[:8], f"({outcome.seconds:.0f} s)", outcome.note[:100]])))
            tracking.log_text(steps_table(outcomes), "study_steps.md")
        tracking.log_metrics({"steps_ran": sum(o.status == "ran" for o in outcomes), "steps_reused": sum(o.status == "reused" for o in outcomes)})
        tracking.describe_run(study_description(profile_name, outcomes, out_root, dataset))
    return outcomes
