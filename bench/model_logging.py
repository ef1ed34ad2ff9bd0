"""Benchmark (not a test): what MLflow lineage and models add to a run, on a temporary SQLite store.

Times, per call, `tracking.log_inputs` for one classifier run's three inputs (PneumoniaMNIST-sized
synthetic splits: 4,708 / 524 / 624 images), `tracking.log_model` (torch.export graph) for smallcnn
and ResNet-18, and `mlflow.pytorch.load_model` of each. A grid logs inputs for every child and one
model (its selected child's) in the parent. Usage: `python bench/model_logging.py [--repeats 3]`;
prints median, min and max seconds and the same as JSON on stdout's last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from pipeline import lineage, tracking  # noqa: E402
from pipeline.data import load_splits  # noqa: E402
from pipeline.models import ModelSpec, build_classifier  # noqa: E402
from pipeline.synthetic import write_synthetic  # noqa: E402


def timed(call, repeats: int) -> dict[str, float]:
    """Median, min and max seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic(root, "pneumoniamnist", counts={"train": 4708, "val": 524, "test": 624}, seed=0)
        data = load_splits("pneumoniamnist", 28, str(root), torch.device("cpu"))
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        mlflow.set_experiment("bench")
        rows = {}
        with mlflow.start_run():
            cfg = {"label_fraction": 0.1, "seed": 0}
            rows["log_inputs (train subset, val, test)"] = timed(lambda: tracking.log_inputs(lineage.classifier_inputs(data, data.train, cfg)), args.repeats)
            for name in ("smallcnn", "resnet18"):
                model = build_classifier(ModelSpec(name, 1, "cifar")).eval()
                ids = []
                rows[f"log_model {name}"] = timed(lambda: ids.append(tracking.log_model(model, lineage.model_example(data), "bench", {})), args.repeats)
                rows[f"load_model {name}"] = timed(lambda: mlflow.pytorch.load_model(f"models:/{ids[-1]}"), args.repeats)
    print(f"{'what':40s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for what, seconds in rows.items():
        print(f"{what:40s} {seconds['median']:9.2f} {seconds['min']:7.2f} {seconds['max']:7.2f}")
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "seconds": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
