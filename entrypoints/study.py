"""`study`: every step of the ten-week study for one dataset, as nested runs of one `study` run."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, apply, main
from pipeline.steps.augment_ablation import run_augment_ablation
from pipeline.steps.baseline import run_baseline
from pipeline.steps.calibrate import run_calibrate
from pipeline.steps.compare import run_compare
from pipeline.data import check_dataset
from pipeline.steps.eda import run_eda
from pipeline.steps.finetune_table import run_finetune_table
from pipeline.steps.linear_probe import run_linear_probe
from pipeline.steps.robustness import run_robustness
from pipeline.steps.ssl_finetune import run_ssl_finetune
from pipeline.steps.ssl_pretrain import run_ssl_pretrain
from pipeline.steps.study import Runner, profile_note, run_study
from pipeline.steps.thresholds import run_thresholds


def stage_runners() -> dict[str, Runner]:
    """Each stage's pipeline call as (config, data_root, input run ids) → None."""
    return {
        "eda": lambda cfg, root, ids: run_eda(cfg, root),
        "baseline": lambda cfg, root, ids: run_baseline(cfg, root),
        "finetune_table": lambda cfg, root, ids: run_finetune_table(cfg),
        "augment_ablation": lambda cfg, root, ids: run_augment_ablation(cfg, root),
        "ssl_pretrain": lambda cfg, root, ids: run_ssl_pretrain(cfg, root),
        "linear_probe": lambda cfg, root, ids: run_linear_probe(cfg, root),
        "ssl_finetune": lambda cfg, root, ids: run_ssl_finetune(cfg, root),
        "calibrate": lambda cfg, root, ids: run_calibrate(cfg, ids["run_id"]),
        "thresholds": lambda cfg, root, ids: run_thresholds(cfg, ids["run_id"], root),
        "robustness": lambda cfg, root, ids: run_robustness(cfg, ids["run_id"], root),
        "compare": lambda cfg, root, ids: run_compare(
            cfg["dataset"], cfg["out_root"], cfg["export_name"], cfg["results_root"], scope=frozenset(ids.values()), not_run=cfg["not_run"], echo=click.echo
        ),
    }


@click.command("study")
@apply(DATA_OPTIONS)
@click.option("--profile", default="quick", show_default=True, help="configs/profiles/<name>.yaml: quick (wiring check) | paper (CPU evidence) | full (GPU) | smoke.")
@click.option("--out", "out_root", default="reports", show_default=True, help="Folder for reports/<dataset>/.")
@click.option("--export-results", "export_name", default="", help="Also write the weekly hand-ins to results/weekN/<dataset>/NAME/.")
@click.option("--results-root", default="results", show_default=True, help="Root of --export-results.")
def command(dataset: str, data_root: str, profile: str, out_root: str, export_name: str, results_root: str) -> None:
    """Run the study in order, reusing every step already FINISHED with the same config and code."""
    check_dataset(dataset)
    outcomes = run_study(dataset, profile or "quick", stage_runners(), data_root, out_root, echo=click.echo, export=(export_name, results_root))
    ran = sum(o.status == "ran" for o in outcomes)
    reused = sum(o.status == "reused" for o in outcomes)
    click.echo(f"study {dataset} ({profile}): {ran} step{'s' if ran != 1 else ''} ran, {reused} reused; tables in {out_root}/{dataset}/")
    note = profile_note(profile or "quick")
    if note:
        click.echo(f"note: {note}")


if __name__ == "__main__":
    main(command)
