"""`calibrate` (week 6): temperature scaling (and optional Platt/isotonic) of a classifier run's logits."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, SOURCE_OPTIONS, apply, main, resolve
from pipeline.steps.calibrate import TEMPERATURE_BOUNDS, at_bound, run_calibrate


@click.command("calibrate")
@apply(DATA_OPTIONS + SOURCE_OPTIONS)
@click.option("--methods", default="", help="Comma list: temperature (always), platt, isotonic.")
def command(dataset: str, data_root: str, run_id: str, config_file: str, **overrides: str) -> None:
    """Fit calibrators on a classifier run's validation logits, report test before/after."""
    cfg = resolve("calibrate", dataset, config_file, **overrides)
    values = run_calibrate(cfg, run_id)
    click.echo(
        f"calibrate {dataset}: T = {values['temperature']:.3f}; val NLL {values['val_nll_before']:.4f} -> "
        f"{values['val_nll_after']:.4f}; test ECE {values['test_ece_before']:.4f} -> {values['test_ece_after']:.4f}, "
        f"test AUROC {values['test_auroc_before']:.4f} -> {values['test_auroc_after']:.4f}"
    )
    if at_bound(values["temperature"]):
        click.echo(
            f"warning: T is at the search bound {TEMPERATURE_BOUNDS}: a single temperature cannot fix these "
            f"logits (e.g. a shifted decision boundary); compare --methods temperature,platt,isotonic",
            err=True,
        )


if __name__ == "__main__":
    main(command)
