"""What every entry point shares: common options, config resolution and one-line error exits."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

import click

from pipeline import config
from pipeline.data import check_dataset
from pipeline.errors import PipelineError
from pipeline.tracking import fail_adopted_run, prepare_store, record_command, under_mlflow_run

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# A new SQLite store announces its table creation at INFO, and a locked store logs each retried write
# with a traceback (pipeline.tracking retries them): keep a user's terminal to one line per problem.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

DATA_OPTIONS = (
    click.option("--dataset", default="breastmnist", show_default=True, help="breastmnist or pneumoniamnist."),
    click.option("--data-root", default="", help="Folder of the npz files (empty: $MEDMNIST_ROOT, else ~/.medmnist)."),
)
TRAINER_OPTIONS = (
    click.option("--config", "config_file", default="", help="YAML file of overrides."),
    click.option("--seed", default="", help="Random seed."),
    click.option("--epochs", default="", help="Training epochs."),
    click.option("--batch-size", default="", help="Training batch size."),
    click.option("--lr", default="", help="Learning rate."),
    click.option("--device", default="", help="auto | cpu | cuda | mps."),
    click.option("--size", default="", help="Image size: 28, 64, 128 or 224."),
)

SOURCE_OPTIONS = (
    click.option("--run-id", default="latest", show_default=True, help="Classifier run to read (latest: newest FINISHED one with predictions)."),
    click.option("--config", "config_file", default="", help="YAML file of overrides."),
    click.option("--seed", default="", help="Random seed."),
    click.option("--device", default="", help="auto | cpu | cuda | mps."),
)


def apply(options: tuple[Callable, ...]) -> Callable:
    """Decorate a command with a group of options (in the listed order)."""

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def resolve(stage: str, dataset: str, config_file: str = "", profile: str = "", **overrides: Any) -> dict[str, Any]:
    """Check the dataset name, then resolve the stage config from files and CLI values."""
    check_dataset(dataset)
    return config.resolve(stage, dataset, overrides, config_file=config_file, profile=profile)


def main(command: click.Command, args: list[str] | None = None) -> None:
    """Run a click command; user mistakes and pipeline failures print one line and exit non-zero."""
    prefix = command.name if command.name == "medmnist-ssl" else f"medmnist-ssl {command.name}"
    adopted = under_mlflow_run()  # closing the run unsets MLFLOW_RUN_ID
    record_command([*prefix.split(), *(sys.argv[1:] if args is None else args)])
    words = sys.argv[1:] if args is None else args
    try:
        if "--help" not in words:  # help opens no store (and creates no mlflow.db)
            prepare_store()
        command.main(args=args, standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as exc:
        message = exc.format_message()
        fail_adopted_run(message, command.name)
        click.echo(f"{prefix}: error: {message} (see --help)", err=True)
        sys.exit(2)
    except PipelineError as exc:
        fail_adopted_run(str(exc), command.name)
        click.echo(f"{prefix}: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, click.Abort):
        after = " (`mlflow run` then marks it FAILED; failure_reason says interrupted)" if adopted else ""
        click.echo(f"{prefix}: interrupted; the run is marked KILLED{after}", err=True)
        sys.exit(130)
    finally:
        record_command([])
