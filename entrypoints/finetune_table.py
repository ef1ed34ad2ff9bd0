"""`finetune_table`: head-only vs. full fine-tuning, tabulated from two finished baseline runs."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, apply, main, resolve
from pipeline.steps.finetune_table import run_finetune_table


@click.command("finetune_table")
@apply(DATA_OPTIONS)
@click.option("--config", "config_file", default="", help="YAML file of overrides.")
@click.option("--model", default="", help="Only consider baseline runs of this model (default: any).")
@click.option("--head-run-id", default="", help="Baseline run with finetune=head (latest: newest FINISHED).")
@click.option("--all-run-id", default="", help="Baseline run with finetune=all (latest: newest FINISHED).")
def command(dataset: str, data_root: str, config_file: str, model: str, **overrides: str) -> None:
    """Tabulate losses, best epoch, AUROC, accuracy and ECE of the head-only and full fine-tuning runs."""
    cfg = resolve("finetune_table", dataset, config_file, filter_model=model, **overrides)
    click.echo(run_finetune_table(cfg), nl=False)


if __name__ == "__main__":
    main(command)
