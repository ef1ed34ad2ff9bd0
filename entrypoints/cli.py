"""`medmnist-ssl`: every entry point as a subcommand, for use without MLflow's project runner."""

from __future__ import annotations

import click

from entrypoints import baseline, calibrate, robustness, thresholds


@click.group(name="medmnist-ssl", context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """medmnist-ssl: supervised and self-supervised study steps on MedMNIST, tracked in MLflow."""


for module in (baseline, calibrate, thresholds, robustness):
    cli.add_command(module.command)


def run() -> None:
    """Console-script entry: one-line errors and non-zero exits, as for `python -m entrypoints.X`."""
    from entrypoints.common import main

    main(cli)
