"""`ssl_pretrain`: contrastive pretraining (SimCLR-lite or MoCo-lite) of an encoder, labels unused."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, TRAINER_OPTIONS, apply, main, resolve
from pipeline.steps.ssl_pretrain import run_ssl_pretrain


@click.command("ssl_pretrain")
@apply(DATA_OPTIONS + TRAINER_OPTIONS)
@click.option("--steps", default="", help="Optimizer-step budget (--epochs, when given, replaces it).")
@click.option("--knn-every", default="", help="kNN monitor every this many steps (and at step 0).")
@click.option("--method", default="", help="simclr | moco.")
@click.option("--model", default="", help="Encoder: smallcnn | resnet18.")
@click.option("--stem", default="", help="resnet18 stem: cifar | imagenet.")
@click.option("--temperature", default="", help="Softmax temperature τ (default 0.2).")
@click.option("--queue-size", default="", help="MoCo queue length.")
@click.option("--moco-momentum", default="", help="MoCo key-encoder momentum.")
@click.option("--bn-splits", default="", help="MoCo batch-norm groups per batch (1 = plain BN).")
@click.option("--resume", default="", help="Run id of an interrupted ssl_pretrain run to continue.")
@click.option("--other-data", is_flag=True, help="With --resume: continue on a data file other than the one the run started on.")
def command(dataset: str, data_root: str, config_file: str, resume: str, other_data: bool, **overrides: str) -> None:
    """Pretrain an encoder without labels and log it (checkpoints/encoder.pt) to MLflow."""
    cfg = resolve("ssl_pretrain", dataset, config_file, **overrides)
    final = run_ssl_pretrain(cfg, data_root, resume, other_data)
    click.echo(
        f"ssl_pretrain {dataset} {cfg['method']} {cfg['model']}: final loss {final['ssl_loss']:.4f}, "
        f"kNN val AUROC {final['knn_val_auroc_init']:.3f} at step 0 (random init) -> {final['knn_val_auroc']:.3f} "
        f"at step {final['step']}"
    )


if __name__ == "__main__":
    main(command)
