"""`augment_ablation`: supervised classifiers per augmentation variant and seed, under one parent run."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, TRAINER_OPTIONS, apply, main, resolve
from pipeline.steps.augment_ablation import run_augment_ablation
from pipeline.results import ABLATION_METRICS
from pipeline.tables import mean_std


@click.command("augment_ablation")
@apply(DATA_OPTIONS + TRAINER_OPTIONS)
@click.option("--variants", default="", help="Comma-separated augmentation presets (none is the control).")
@click.option("--seeds", default="", help="Comma-separated seeds (--seed N is the single seed N).")
@click.option("--model", default="", help="smallcnn | resnet18.")
@click.option("--stem", default="", help="resnet18 stem: cifar | imagenet.")
@click.option("--weights", default="", help="none | imagenet.")
@click.option("--finetune", default="", help="all | head.")
def command(dataset: str, data_root: str, config_file: str, seed: str, seeds: str, **overrides: str) -> None:
    """Train one classifier per (augmentation variant x seed) and tabulate mean ± std per variant."""
    if seed and seeds:
        raise click.UsageError("give either --seed (one seed) or --seeds (a list), not both")
    cfg = resolve("augment_ablation", dataset, config_file, seeds=seeds or seed, **overrides)
    summary = run_augment_ablation(cfg, data_root)
    for entry in summary:
        values = "  ".join(f"{m} {mean_std(entry, m)}" for m in ABLATION_METRICS)
        click.echo(f"{entry['variant']:<20} n={entry['n']}  {values}")


if __name__ == "__main__":
    main(command)
