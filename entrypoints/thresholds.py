"""`thresholds` (week 7): operating points chosen on validation, reported on test with CIs."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, SOURCE_OPTIONS, apply, main, resolve
from pipeline.steps.thresholds import positive_text, run_thresholds


@click.command("thresholds")
@apply(DATA_OPTIONS + SOURCE_OPTIONS)
@click.option("--positive-class", default="", help="0, 1 or finding: the class TPR, FPR, precision and the thresholds refer to (default: the dataset's finding).")
@click.option("--target-tprs", default="", help="Comma list of sensitivity targets (default 0.9,0.95).")
@click.option("--target-fprs", default="", help="Comma list of false positive rate targets (default 0.05,0.1).")
@click.option("--confidence", default="", help="Error gallery: top-label confidence at least this (default 0.9).")
@click.option("--bootstrap", default="", help="Bootstrap resamples for the CIs (default 1000).")
def command(dataset: str, data_root: str, run_id: str, config_file: str, **overrides: str) -> None:
    """Choose decision thresholds on a classifier run's validation predictions; report them on test."""
    cfg = resolve("thresholds", dataset, config_file, **overrides)
    values = run_thresholds(cfg, run_id, data_root)
    click.echo(
        f"thresholds {dataset}, positive class {positive_text(dataset, cfg['positive_class'])}: "
        f"Youden t = {values['threshold_youden']:.3f} (test TPR {values['test_tpr_youden']:.3f}, "
        f"specificity {values['test_specificity_youden']:.3f}); max-F1 t = {values['threshold_max_f1']:.3f}; "
        f"{int(values['high_confidence_errors'])} high-confidence test errors"
    )


if __name__ == "__main__":
    main(command)
