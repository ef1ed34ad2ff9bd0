"""`baseline`: a supervised classifier (smallcnn or resnet18; head-only or full fine-tuning)."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, TRAINER_OPTIONS, apply, main, resolve
from pipeline.baseline import run_baseline


@click.command("baseline")
@apply(DATA_OPTIONS + TRAINER_OPTIONS)
@click.option("--model", default="", help="smallcnn | resnet18.")
@click.option("--stem", default="", help="resnet18 stem: cifar | imagenet.")
@click.option("--weights", default="", help="none | imagenet.")
@click.option("--finetune", default="", help="all | head.")
@click.option("--augment", default="", help="Augmentation preset.")
@click.option("--label-fraction", default="", help="Fraction of training labels (stratified).")
def command(dataset: str, data_root: str, config_file: str, **overrides: str) -> None:
    """Train one supervised classifier and log it to MLflow."""
    cfg = resolve("baseline", dataset, config_file, **overrides)
    results = run_baseline(cfg, data_root)
    click.echo(
        f"baseline {dataset} {cfg['model']}: test AUROC {results['test_auroc']:.3f} "
        f"(95% CI {results['test_auroc_ci_low']:.3f}-{results['test_auroc_ci_high']:.3f}), "
        f"test acc {results['test_acc']:.3f}, best epoch {int(results['best_epoch'])}"
    )


if __name__ == "__main__":
    main(command)
