"""Whole studies timed end to end: one subprocess per dataset on one SQLite store, all at once."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import PeakMemory, Row

from pipeline.data import resolve_root

REPO = Path(__file__).resolve().parent.parent


def study_rows(args, device: torch.device, logs: Path) -> list[Row]:
    """Whole studies on one SQLite store, one subprocess per dataset of --study-dataset, all at once
    (they share the device, as two users' studies would): wall time of each, and of all together
    when there are several. Each study's output goes to `<logs>-<dataset>.log`. The store is fresh,
    or --study-store's folder, where a rerun reuses the steps an earlier, cut-off call finished and
    appends to the logs (so their step lines add up to the whole study)."""
    datasets = list(dict.fromkeys(args.study_dataset.split(",")))
    data_root = str(resolve_root(args.data_root).resolve())  # the studies run in the store's folder
    with contextlib.ExitStack() as stack:
        if args.study_store:
            tmp = str(Path(args.study_store).resolve())
            Path(tmp).mkdir(parents=True, exist_ok=True)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="perf-study-"))
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1"}
        subprocess.run([sys.executable, "-c", "from pipeline import tracking; tracking.ensure_store()"], cwd=tmp, env=env, check=True)
        with PeakMemory(torch.device("cpu")) as memory:
            start, procs, ended = time.perf_counter(), {}, {}
            for dataset in datasets:
                command = [
                    sys.executable,
                    "-m",
                    "entrypoints.study",
                    "--dataset",
                    dataset,
                    "--profile",
                    args.study_profile,
                    "--data-root",
                    data_root,
                    "--out",
                    f"{tmp}/reports",
                ]
                log = stack.enter_context(Path(f"{logs}-{dataset}.log").open("a" if args.study_store else "w"))
                procs[dataset] = subprocess.Popen(command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
                stack.callback(reap, procs[dataset])
            while len(ended) < len(procs):
                for dataset, proc in procs.items():
                    if dataset not in ended and proc.poll() is not None:
                        ended[dataset] = time.perf_counter() - start
                time.sleep(0.2)
    rows = []
    store = f"store {args.study_store} (finished steps reused)" if args.study_store else "fresh SQLite store"
    for dataset in datasets:
        code = procs[dataset].returncode
        note = (
            f"{args.study_profile} profile, {dataset}, {store}"
            + (f", {len(datasets)} studies at once" if len(datasets) > 1 else "")
            + ("" if code == 0 else f"; FAILED rc={code}, see {logs}-{dataset}.log")
        )
        rows.append(
            Row(
                "study",
                "-",
                f"{args.study_profile} {dataset}",
                str(device),
                None,
                round(ended[dataset], 1),
                memory.mib,
                0,
                1,
                unit="-",
                note=note + " (peak = host memory of this benchmark's process tree, all studies together)",
                extra={"returncode": code},
            )
        )
        print(f"  {'study':<10} {'-':<9} {dataset:<16} {ended[dataset]:>10.1f} s" + ("" if code == 0 else f"  FAILED rc={code}"), flush=True)
    if len(datasets) > 1:
        rows.append(
            Row(
                "study",
                "-",
                f"{args.study_profile} all",
                str(device),
                None,
                round(max(ended.values()), 1),
                memory.mib,
                0,
                1,
                unit="-",
                note=f"{args.study_profile} profile, {'+'.join(datasets)} at once; wall time until the last finished",
            )
        )
    return rows


def reap(proc: subprocess.Popen) -> None:
    """Stop a study subprocess still running when the benchmark ends early (error, Ctrl-C)."""
    if proc.poll() is None:
        proc.terminate()
        proc.wait()
