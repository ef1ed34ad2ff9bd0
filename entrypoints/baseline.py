"""`baseline`: a supervised classifier (smallcnn or resnet18; head-only or full fine-tuning)."""

from __future__ import annotations

import click

from entrypoints.common import DATA_OPTIONS, TRAINER_OPTIONS, apply, main, resolve
from pipeline.steps.baseline import resume_baseline, run_baseline
from pipeline.data import check_dataset


@click.command("baseline")
@apply(DATA_OPTIONS + TRAINER_OPTIONS)
@click.option("--model", default="", help="smallcnn | resnet18.")
@click.option("--stem", default="", help="resnet18 stem: cifar | imagenet.")
@click.option("--weights", default="", help="auto (imagenet for --finetune head) | none | imagenet.")
@click.option("--deterministic", default="", help="true: one CPU thread and deterministic algorithms (same seed, same numbers on any core count).")
@click.option("--dropout", default="", help="Dropout before the head while training (MC dropout in week 8 then samples it).")
@click.option("--finetune", default="", help="all | head.")
@click.option("--augment", default="", help="Augmentation preset.")
@click.option("--label-fraction", default="", help="Fraction of training labels (stratified).")
@click.option("--resume", default="", help="Id of a KILLED, FAILED or stale baseline run to finish from its last.pt.")
@click.option("--other-data", is_flag=True, help="With --resume: continue on a data file other than the one the run started on.")
def command(dataset: str, data_root: str, config_file: str, resume: str, other_data: bool, **overrides: str) -> None:
    """Train one supervised classifier and log it to MLflow."""
    if other_data and not resume:
        raise click.UsageError("--other-data only applies with --resume")
    if resume:
        results = resume_run(resume, dataset, data_root, config_file, other_data=other_data, **overrides)
    else:
        results = run_baseline(resolve("baseline", dataset, config_file, **overrides), data_root)
    report(dataset, results)


def resume_run(run_id: str, dataset: str, data_root: str, config_file: str, device: str, other_data: bool = False, **overrides: str) -> dict[str, float]:
    """Finish a run with its own config; settings other than the device and data are refused."""
    given = [f"--{key.replace('_', '-')}" for key, value in overrides.items() if value] + (["--config"] if config_file else [])
    if given:
        raise click.UsageError(f"--resume continues run {run_id} with its own config; drop {', '.join(given)}")
    check_dataset(dataset)
    return resume_baseline(run_id, dataset, data_root, device, other_data)


def report(dataset: str, results: dict[str, float]) -> None:
    """One summary line of the finished run."""
    click.echo(
        f"baseline {dataset}: test AUROC {results['test_auroc']:.3f} "
        f"(95% CI {results['test_auroc_ci_low']:.3f}-{results['test_auroc_ci_high']:.3f}), "
        f"test acc {results['test_acc']:.3f}, best epoch {int(results['best_epoch'])}"
    )


if __name__ == "__main__":
    main(command)
