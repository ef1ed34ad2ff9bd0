"""`linear_probe`: label efficiency of a frozen SSL encoder vs. supervised-only (and ImageNet) baselines."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, apply, main, resolve
from pipeline.results import METHOD_LABELS
from pipeline.steps.linear_probe import run_linear_probe
from pipeline.tables import mean_std


@click.command("linear_probe")
@apply(DATA_OPTIONS)
@click.option("--config", "config_file", default="", help="YAML file of overrides.")
@click.option("--ssl-run-id", default="", help="ssl_pretrain run id, several (comma-separated, one per pretraining seed), or latest.")
@click.option("--label-fractions", default="", help="Comma-separated fractions, e.g. 0.01,0.05,0.1,1.")
@click.option("--seeds", default="", help="Comma-separated seeds, e.g. 0,1,2.")
@click.option("--methods", default="", help="Comma-separated: ssl_probe,supervised,random_probe,imagenet_probe.")
@click.option("--supervised-steps", default="", help="Optimizer steps of the supervised-only baseline (default 300).")
@click.option("--epochs", "supervised_epochs", default="", help="Epochs of the supervised-only baseline (replaces --supervised-steps).")
@click.option("--batch-size", default="", help="Batch size of the supervised-only baseline.")
@click.option("--lr", default="", help="Learning rate of the supervised-only baseline.")
@click.option("--device", default="", help="auto | cpu | cuda | mps.")
def command(dataset: str, data_root: str, config_file: str, **overrides: str) -> None:
    """Fit linear probes at several label fractions × seeds and log the label-efficiency table."""
    cfg = resolve("linear_probe", dataset, config_file, **overrides)
    not_run = {}
    for row in run_linear_probe(cfg, data_root):
        if row["status"] != "ok":
            not_run[row["method"]] = row["status"]
            continue
        click.echo(
            f"{METHOD_LABELS.get(row['method'], row['method']):<18} {row['label_fraction']:>6.0%}  "
            f"test AUROC {mean_std(row, 'test_auroc')}  acc {mean_std(row, 'test_acc')}"
        )
    for method, status in not_run.items():
        click.echo(f"{METHOD_LABELS.get(method, method)}: {status}")


if __name__ == "__main__":
    main(command)
