"""`compare`: cross-week tables (Markdown, CSV, LaTeX), figures and a draft write-up for a dataset."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, apply, main
from pipeline.data import check_dataset
from pipeline.steps.compare import run_compare


@click.command("compare")
@apply(DATA_OPTIONS)
@click.option("--out", "out_root", default="reports", show_default=True, help="Folder for reports/<dataset>/.")
@click.option("--export-results", "export_name", default="", help="Also write the weekly hand-ins to results/weekN/<dataset>/NAME/.")
@click.option("--results-root", default="results", show_default=True, help="Root of --export-results.")
def command(dataset: str, data_root: str, out_root: str, export_name: str, results_root: str) -> None:
    """Query the tracking store and write the study's tables for one dataset."""
    check_dataset(dataset)
    built, out_dir = run_compare(dataset, out_root, export_name, results_root, echo=click.echo)
    for table in built:
        click.echo(f"{table.name:<28} {'MISSING' if table.missing and not table.rows else f'{len(table.rows)} rows'}")
    click.echo(f"tables, figures, draft and slides written to {out_dir}/")


if __name__ == "__main__":
    main(command)
