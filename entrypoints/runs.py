"""`runs`: the tracking store's housekeeping (`runs clean-stale` marks hard-killed runs KILLED) and
the UI's address (`runs address`: where the study's runs table is, and what to look at)."""

from __future__ import annotations

import re
import time

import click

from entrypoints.common import main
from pipeline import tracking

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class Age(click.ParamType):
    """A duration such as `90s`, `30m`, `2h` or `1d`, converted to seconds."""

    name = "age"

    def convert(self, value, param, ctx) -> float:
        """Seconds in `value`; anything else is a one-line usage error."""
        if isinstance(value, float):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(value))
        if not match:
            self.fail(f"{value!r} is not an age like 90s, 30m, 2h or 1d", param, ctx)
        return float(match.group(1)) * UNITS[match.group(2)]


@click.group("runs")
def group() -> None:
    """Inspect and repair runs in the tracking store ($MLFLOW_TRACKING_URI)."""


@group.command("clean-stale")
@click.option("--older-than", type=Age(), default=None, help="Also mark RUNNING runs older than this (e.g. 2h, 30m).")
@click.option("--dry-run", is_flag=True, help="List what would be marked; change nothing.")
def clean_stale(older_than: float | None, dry_run: bool) -> None:
    """Mark runs left RUNNING by a hard kill as KILLED.

    A run is stale when its process (tags host, pid) is gone from this host, or, with
    --older-than, when it has been RUNNING longer than that and its process is not alive here.
    FINISHED, FAILED and KILLED runs and runs of live processes are never touched, nor, on a
    shared server, runs the login may read but not change (listed as `not yours`).
    """
    stale = tracking.find_stale_runs(older_than)
    verb = "would mark" if dry_run else "marked"
    changed = others = 0
    for run in stale:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.start_time))
        try:
            marked = dry_run or tracking.mark_killed(run)
        except tracking.NotYours as exc:  # a shared server: another user's run, readable but not ours to change
            others += 1
            click.echo(f"not yours      {run.run_id}  {run.stage}  {run.dataset}  started {started}  {exc}")
            continue
        if marked:
            changed += 1
            click.echo(f"{verb} KILLED  {run.run_id}  {run.stage}  {run.dataset}  started {started}  {run.reason}")
    summary = f"{changed} stale run(s) {verb} KILLED" if changed or others else "no stale runs"
    click.echo(summary + (f"; {others} left alone: not yours to change" if others else ""))


TOUR = """In the runs table:
  - the study is one row: expand it (+) for its steps; the grids (augment_ablation, linear_probe,
    ssl_finetune) expand again into one run per method x labels x seed
  - Columns: add metrics test_auroc, best_val_auroc, test_ece and tags method, ssl_method, label_fraction
  - Group by tags.method (or tags.ssl_method) to compare methods; the Dataset column names each run's data
  - the answers: the study run's description, and the compare run's reports/ (draft.md,
    week6_paired_differences.md); models: the Models tab and models:/<dataset>-classifier@champion"""


@group.command("address")
@click.option("--dataset", default="breastmnist", show_default=True, help="The experiment to open.")
@click.option("--url", default="http://127.0.0.1:5000", show_default=True, help="Where `mlflow ui` serves.")
def address(dataset: str, url: str) -> None:
    """Print the address of the dataset's runs table (the model-training view) and a short tour."""
    experiment_id = tracking.experiment_id(dataset)
    if experiment_id is None:
        click.echo(f"no experiment {dataset!r} in {tracking.mlflow_uri()} yet: run `make demo` first; the UI opens at {url}")
        return
    click.echo(f"open {url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning\n{TOUR}")


if __name__ == "__main__":
    main(group)
