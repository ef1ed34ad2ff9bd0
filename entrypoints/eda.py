"""`eda`: week 2 data exploration of one dataset, plus the error gallery of a classifier run."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, apply, main, resolve
from pipeline.steps.eda import run_eda


@click.command("eda")
@apply(DATA_OPTIONS)
@click.option("--config", "config_file", default="", help="YAML file of overrides.")
@click.option("--seed", default="", help="Seed of the sample-image choice.")
@click.option("--size", default="", help="Image size: 28, 64, 128 or 224.")
@click.option("--run-id", default="", help="Classifier run for the error gallery (latest: newest baseline; none: skip).")
@click.option("--gallery-n", default="", help="Number of most confident test mistakes in the gallery.")
def command(dataset: str, data_root: str, config_file: str, **overrides: str) -> None:
    """Explore a dataset (statistics, class balance, samples, histograms, duplicates) and log it to MLflow."""
    cfg = resolve("eda", dataset, config_file, **overrides)
    for line in run_eda(cfg, data_root):
        click.echo(line)


if __name__ == "__main__":
    main(command)
