"""`medmnist-ssl`: every entry point as a subcommand, for use without MLflow's project runner."""

from __future__ import annotations

import click

from entrypoints import (
    augment_ablation,
    baseline,
    calibrate,
    compare,
    eda,
    finetune_table,
    linear_probe,
    robustness,
    runs,
    ssl_finetune,
    ssl_pretrain,
    study,
    thresholds,
)


# token_normalize_func: `finetune-table` and `finetune_table` (the MLproject name) are the same command.
@click.group(
    name="medmnist-ssl",
    context_settings={"help_option_names": ["-h", "--help"], "token_normalize_func": lambda t: t.replace("-", "_")},
)
def cli() -> None:
    """medmnist-ssl: supervised and self-supervised study steps on MedMNIST, tracked in MLflow."""


for module in (eda, baseline, finetune_table, augment_ablation, ssl_pretrain, linear_probe, ssl_finetune, calibrate, thresholds, robustness, compare, study):
    cli.add_command(module.command)
cli.add_command(runs.group)


def run() -> None:
    """Console-script entry: one-line errors and non-zero exits, as for `python -m entrypoints.X`."""
    from entrypoints.common import main

    main(cli)
