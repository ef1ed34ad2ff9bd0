"""`robustness` (week 8): a classifier run's checkpoint under corruptions, and MC-dropout uncertainty."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, SOURCE_OPTIONS, apply, main, resolve
from pipeline.steps.robustness import run_robustness


@click.command("robustness")
@apply(DATA_OPTIONS + SOURCE_OPTIONS)
@click.option("--corruptions", default="", help="Comma list of gaussian_noise, gaussian_blur, contrast, brightness.")
@click.option("--severities", default="", help="Comma list of severities 1-5 (default all).")
@click.option("--mc-passes", default="", help="MC-dropout forward passes (default 20).")
@click.option("--mc-dropout-p", default="", help="Dropout at the head input for models trained without (default 0.2).")
def command(dataset: str, data_root: str, run_id: str, config_file: str, **overrides: str) -> None:
    """Evaluate a classifier run's checkpoint under corrupted test images and with MC dropout."""
    cfg = resolve("robustness", dataset, config_file, **overrides)
    values = run_robustness(cfg, run_id, data_root)
    click.echo(values["dropout_note"])
    click.echo(
        f"robustness {dataset}: clean test AUROC {values['clean_test_auroc']:.3f}, mean corrupted "
        f"{values['mean_corrupted_auroc']:.3f}, worst {values['worst_corrupted_auroc']:.3f}; MC-dropout entropy "
        f"flags errors with AUROC {values['mc_error_auroc_entropy']:.3f}"
    )


if __name__ == "__main__":
    main(command)
