"""`ssl_finetune`: fine-tune the SSL encoder at several label fractions × seeds; week-6 table."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, apply, main, resolve
from pipeline.results import METHOD_LABELS
from pipeline.steps.ssl_finetune import run_ssl_finetune
from pipeline.tables import mean_std


@click.command("ssl_finetune")
@apply(DATA_OPTIONS)
@click.option("--config", "config_file", default="", help="YAML file of overrides.")
@click.option("--ssl-run-id", default="", help="ssl_pretrain run id, several (comma-separated, one per pretraining seed), or latest.")
@click.option("--label-fractions", default="", help="Comma-separated fractions, e.g. 0.01,0.05,0.1,1.")
@click.option("--seeds", default="", help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--steps", default="", help="Optimizer steps at every label fraction (default 300).")
@click.option("--epochs", default="", help="Fine-tuning epochs (when given, replaces --steps).")
@click.option("--batch-size", default="", help="Batch size.")
@click.option("--lr", default="", help="Head learning rate.")
@click.option("--encoder-lr-scale", default="", help="Encoder lr = lr x this; comma-separated values are a grid chosen on validation (default 0.1,1).")
@click.option("--device", default="", help="auto | cpu | cuda | mps.")
def command(dataset: str, data_root: str, config_file: str, **overrides: str) -> None:
    """Fine-tune the pretrained encoder and log the week-6 comparison table."""
    cfg = resolve("ssl_finetune", dataset, config_file, **overrides)
    for row in run_ssl_finetune(cfg, data_root):
        click.echo(
            f"{METHOD_LABELS.get(row['method'], row['method']):<28} {row['label_fraction']:>6.0%}  n={row['n']}  "
            f"AUROC {mean_std(row, 'test_auroc')}  acc {mean_std(row, 'test_acc')}  ECE {mean_std(row, 'test_ece')}"
        )


if __name__ == "__main__":
    main(command)
