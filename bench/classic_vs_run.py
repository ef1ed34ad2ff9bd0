"""Benchmark (not a test): MedMNIST's classic per-sample script against our whole `mlflow run`, side by side.

Both sides train the project's smallcnn (`pipeline.models`) on the same dataset for the same epochs
and batch size, each in its own subprocess of this one, in turns (classic, ours, classic, ours, …) so
drift in the machine's speed hits both alike:

  classic  medmnist's getting-started style: `medmnist` Dataset + `ToTensor()`/`Normalize(.5, .5)`,
           shuffled `DataLoader` (0 workers), Adam, validation AUROC with medmnist's `Evaluator`
           every epoch, test once at the end
  ours     `mlflow run . -e baseline --env-manager local` into a fresh temporary SQLite store

It prints each round's wall times and ratio classic/ours and their median. `--profile` then runs
our entry point once more in a process of its own (same arguments, its own fresh store, no `mlflow
run` around it) with timed spans: training epochs, batch-norm recomputation, per-epoch validation,
imports (all of them, also those made inside the other spans), store preparation, data loading, the
final evaluation and logging, model logging and figures. Usage: `python bench/classic_vs_run.py [--dataset pneumoniamnist]
[--epochs 5] [--batch 128] [--rounds 2] [--profile] [--other CHECKOUT] [--out FILE.json]`; `--other`
times a second checkout's `mlflow run` in the same turns (the code before a change, say).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

# (label, module, attribute) of the timed spans: the name the caller looks up, so wrapping it times every
# call; a label may name several places (wrapped where they exist, so older checkouts can be profiled too).
SPANS = (
    ("training epochs", "pipeline.train", "train_epoch"),
    ("batch-norm recomputation", "pipeline.train", "recompute_bn_statistics"),
    ("batch-norm recomputation", "pipeline.batchnorm", "recompute_bn_statistics"),
    ("per-epoch validation", "pipeline.train", "predict_logits"),
    ("store preparation", "entrypoints.common", "prepare_store"),
    ("data loading", "pipeline.baseline", "load_splits"),
    ("data loading", "pipeline.steps.baseline", "load_splits"),
    ("final evaluation and logging", "pipeline.supervised", "log_evaluation"),
    ("final evaluation and logging", "pipeline.supervised", "evaluate"),
    ("final evaluation and logging", "pipeline.supervised", "log_classifier"),
    ("model logging", "pipeline.tracking", "log_model"),
    ("figures", "pipeline.tracking", "log_figure"),
    ("metric logging (every epoch and the final ones)", "pipeline.tracking", "log_metrics"),
)


def environment(store: Path) -> dict[str, str]:
    """The subprocesses' environment: the fresh store, no progress bars, this interpreter first on PATH,
    and no experiment or run id inherited from the caller (they would point into another store)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    inherited = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    return {
        **inherited,
        "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db",
        "TQDM_DISABLE": "1",
        "PATH": path,
        "PYTHONPATH": python_path,
        "MLFLOW_EXPERIMENT_NAME": "bench",
    }


def data_root(value: str) -> str:
    """The npz folder: the argument, else $MEDMNIST_ROOT, else medmnist's default."""
    return str(Path(value or os.environ.get("MEDMNIST_ROOT", "~/.medmnist")).expanduser().resolve())


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    """Wall seconds of one subprocess, which must succeed."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} … failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def worker_command(args: argparse.Namespace, mode: str = "--worker") -> list[str]:
    """This script in one of its worker modes (`--worker`: the classic script; `--spans-worker`: our
    entry point with timed spans), on the benchmark's dataset, epochs and batch."""
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        mode,
        "--dataset",
        args.dataset,
        "--data-root",
        data_root(args.data_root),
        "--epochs",
        str(args.epochs),
        "--batch",
        str(args.batch),
    ]


def baseline_args(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The baseline parameters both `mlflow run` and the profiled entry point get."""
    return [("dataset", args.dataset), ("data_root", data_root(args.data_root)), ("model", "smallcnn"), ("epochs", str(args.epochs)), ("batch_size", str(args.batch))]


def ours_command(args: argparse.Namespace, repo: Path = REPO) -> list[str]:
    """The whole `mlflow run` of the baseline step of the project checkout at `repo`."""
    params = [word for key, value in baseline_args(args) for word in ("-P", f"{key}={value}")]
    return [str(Path(sys.executable).parent / "mlflow"), "run", str(repo), "-e", "baseline", *params, "--env-manager", "local"]


def classic_worker(args: argparse.Namespace) -> None:
    """The classic per-sample training script (what MedMNIST's getting-started notebook does)."""
    import medmnist
    import torch
    import torch.utils.data as data
    import torchvision.transforms as transforms
    from torch import nn

    from pipeline.models import ModelSpec, build_classifier

    info = medmnist.INFO[args.dataset]
    data_class = getattr(medmnist, info["python_class"])
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=[0.5], std=[0.5])])
    splits = {s: data_class(split=s, transform=transform, download=False, root=args.data_root) for s in ("train", "val", "test")}
    train_loader = data.DataLoader(splits["train"], batch_size=args.batch, shuffle=True)
    eval_loaders = {s: data.DataLoader(splits[s], batch_size=2 * args.batch, shuffle=False) for s in ("val", "test")}
    torch.manual_seed(0)
    model = build_classifier(ModelSpec("smallcnn", in_channels=info["n_channels"]))
    criterion = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def evaluate(split: str) -> float:
        model.eval()
        scores = []
        with torch.no_grad():
            for inputs, _ in eval_loaders[split]:
                p = torch.sigmoid(model(inputs).view(-1))
                scores.append(torch.stack([1 - p, p], dim=1))
        auc, _ = medmnist.Evaluator(args.dataset, split, root=args.data_root).evaluate(torch.cat(scores).numpy())
        return auc

    for epoch in range(args.epochs):
        model.train()
        for inputs, targets in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(inputs).view(-1), targets.view(-1).float())
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: val auc {evaluate('val'):.3f}", flush=True)
    print(f"test auc {evaluate('test'):.3f}", flush=True)


def rounds(args: argparse.Namespace) -> list[dict[str, float]]:
    """Classic and ours in turns (then `--other`'s run, if given), each run into its own fresh store;
    wall seconds of each."""
    out = []
    for index in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="classic-vs-run-") as tmp:
            classic = timed(worker_command(args), environment(Path(tmp)), Path(tmp))
        with tempfile.TemporaryDirectory(prefix="classic-vs-run-") as tmp:
            ours = timed(ours_command(args), environment(Path(tmp)), Path(tmp))
        row = {"classic_s": round(classic, 2), "ours_s": round(ours, 2), "ratio": round(classic / ours, 3)}
        line = f"round {index + 1}: classic {classic:6.1f} s  ours {ours:6.1f} s  classic/ours {classic / ours:.2f}"
        if args.other:
            with tempfile.TemporaryDirectory(prefix="classic-vs-run-") as tmp:
                other = timed(ours_command(args, Path(args.other).resolve()), environment(Path(tmp)), Path(tmp))
            row.update(other_s=round(other, 2), other_ratio=round(classic / other, 3))
            line += f"  other {other:6.1f} s  classic/other {classic / other:.2f}"
        out.append(row)
        print(line, flush=True)
    return out


class Spans:
    """Seconds spent in each wrapped callable (outermost calls only) and in imports, in this process."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.depth: dict[str, int] = {}

    def wrap(self, label: str, func: Callable) -> Callable:
        """`func`, timed under `label`; a call made inside another call of the same label is not counted twice."""

        @functools.wraps(func)
        def timed_call(*args, **kwargs):
            self.depth[label] = self.depth.get(label, 0) + 1
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.depth[label] -= 1
                if not self.depth[label]:
                    self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        return timed_call


def spans_worker(args: argparse.Namespace) -> None:
    """Our baseline entry point in this process, its spans timed; prints them as JSON on the last line."""
    import importlib._bootstrap as bootstrap

    spans = Spans()
    bootstrap._find_and_load = spans.wrap("imports", bootstrap._find_and_load)
    start = time.perf_counter()
    from entrypoints.baseline import command
    from entrypoints.common import main as run_command

    for label, module, name in SPANS:
        try:
            target = importlib.import_module(module)
        except ModuleNotFoundError:  # a module of another checkout's layout
            continue
        if hasattr(target, name):
            setattr(target, name, spans.wrap(label, getattr(target, name)))
    words = [word for key, value in baseline_args(args) for word in (f"--{key.replace('_', '-')}", value)]
    try:
        run_command(command, words)
    except SystemExit as done:
        if done.code:
            raise
    print(json.dumps({"entry point (in process)": time.perf_counter() - start, **spans.seconds}))


def profile(args: argparse.Namespace) -> dict[str, float]:
    """Our entry point once with its spans timed (its own fresh store): seconds of each, the process
    wall time, and everything but the training epochs."""
    with tempfile.TemporaryDirectory(prefix="classic-vs-run-") as tmp:
        command = worker_command(args, "--spans-worker")
        env = environment(Path(tmp))
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        total = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"the profiled entry point failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    spans = {"entry point process": total, **json.loads(done.stdout.strip().splitlines()[-1])}
    spans["everything but training epochs"] = total - spans["training epochs"]
    return {label: round(seconds, 2) for label, seconds in spans.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--data-root", default="", help="Folder of the official npz files (default $MEDMNIST_ROOT).")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="Alternated rounds (classic, then ours).")
    parser.add_argument("--profile", action="store_true", help="Also profile one run of our entry point.")
    parser.add_argument("--other", default="", help="Another checkout of this project (e.g. before a change), run after ours in each round.")
    parser.add_argument("--out", default="", help="Write the results as JSON here.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spans-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return classic_worker(args)
    if args.spans_worker:
        return spans_worker(args)
    measured = rounds(args)
    ratios = [r["ratio"] for r in measured]
    report = {
        "meta": {"dataset": args.dataset, "epochs": args.epochs, "batch": args.batch, "cpus": os.cpu_count(), "load_before": os.getloadavg()},
        "rounds": measured,
        "median_ratio": statistics.median(ratios),
        "median_ours_s": statistics.median(r["ours_s"] for r in measured),
    }
    print(f"median classic/ours {report['median_ratio']:.2f} over {len(ratios)} rounds (range {min(ratios):.2f}–{max(ratios):.2f})")
    if args.other:
        report["other"] = str(Path(args.other).resolve())
        report["median_other_ratio"] = statistics.median(r["other_ratio"] for r in measured)
        print(f"median classic/other {report['median_other_ratio']:.2f}")
    if args.profile:
        spans = profile(args)
        report["profile"] = spans
        for label, seconds in spans.items():
            print(f"  {label:<34} {seconds:7.2f} s")
        share = 1 - spans["training epochs"] / report["median_ours_s"]
        report["non_epoch_share_of_ours"] = round(share, 3)
        print(f"everything but the training epochs: {share:.0%} of the median `mlflow run`")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
