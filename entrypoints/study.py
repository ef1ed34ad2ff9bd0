"""`study`: every step of the ten-week study for one dataset, as nested runs of one `study` run."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, apply, main
from pipeline.data import check_dataset
from pipeline.study import profile_note, run_study


@click.command("study")
@apply(DATA_OPTIONS)
@click.option("--profile", default="quick", show_default=True, help="configs/profiles/<name>.yaml: quick (wiring check) | paper (CPU evidence) | full (GPU) | smoke.")
@click.option("--out", "out_root", default="reports", show_default=True, help="Folder for reports/<dataset>/.")
def command(dataset: str, data_root: str, profile: str, out_root: str) -> None:
    """Run the study in order, reusing every step already FINISHED with the same config and code."""
    check_dataset(dataset)
    outcomes = run_study(dataset, profile or "quick", data_root, out_root, echo=click.echo)
    ran = sum(o.status == "ran" for o in outcomes)
    reused = sum(o.status == "reused" for o in outcomes)
    click.echo(f"study {dataset} ({profile}): {ran} step{'s' if ran != 1 else ''} ran, {reused} reused; "
               f"tables in {out_root}/{dataset}/")
    note = profile_note(profile or "quick")
    if note:
        click.echo(f"note: {note}")


if __name__ == "__main__":
    main(command)
