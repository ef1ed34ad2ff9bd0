"""Learning curves of SSL pretraining: kNN and 10%-label linear-probe validation AUROC against
optimizer steps, from which the profiles' step budgets are chosen (docs/results.md).

One long pretraining run per (dataset, method) with the shipped loop (`pipeline.pretrain`); at every
monitor point a logistic-regression probe is also fitted on a stratified 10% of the training labels,
its C chosen on validation as `linear_probe` does. Only validation is scored, never test. Each
monitor point is appended to a JSON-lines file as it is measured, so a stopped run keeps its curve.

    python bench/ssl_curves.py --dataset breastmnist --method simclr --steps 1500 --out docs/bench/curves.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pipeline import config
from pipeline.data import load_splits, stratified_subset
from pipeline.features import extract_features
from pipeline.models import ModelSpec, build_classifier
from pipeline.pretrain import PretrainSettings, pretrain
from pipeline.probe import fit_linear_head
from pipeline import metrics
from pipeline.runtime import configure_speed, prepare_model, seed_everything
from pipeline.ssl import build_ssl


def probe_auroc(backbone, data, cfg, fraction: float, cs: list[float]) -> float:
    """Validation AUROC of a linear probe on a stratified `fraction` of the training labels (subset seed 0)."""
    train = extract_features(backbone, data.train, cfg["eval_batch_size"]).cpu().numpy()
    val = extract_features(backbone, data.val, cfg["eval_batch_size"]).cpu().numpy()
    train_y, val_y = data.train.labels.cpu().numpy(), data.val.labels.cpu().numpy()
    subset = stratified_subset(train_y, fraction, 0)
    head = fit_linear_head(train[subset], train_y[subset], val, val_y, cs, 0)
    return metrics.auroc(head.logits(val), val_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--method", default="simclr", choices=["simclr", "moco"])
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--moco-momentum", type=float, default=0.99)
    parser.add_argument("--probe-fraction", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    overrides = {
        "method": args.method,
        "model": args.model,
        "steps": args.steps,
        "epochs": 0,
        "knn_every": args.every,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "moco_momentum": args.moco_momentum,
        "device": args.device,
    }
    cfg = config.resolve("ssl_pretrain", args.dataset, overrides)
    cs = config.resolve("linear_probe", args.dataset, {})["probe_cs"]
    device = torch.device(args.device)
    configure_speed(device)
    seed_everything(cfg["seed"])
    data = load_splits(cfg["dataset"], cfg["size"], "", device)
    spec = ModelSpec(model=cfg["model"], in_channels=data.channels, stem=cfg["stem"])
    module = prepare_model(build_ssl(cfg["method"], build_classifier(spec), cfg), device, cfg)
    meta = {
        "dataset": args.dataset,
        "method": args.method,
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "seed": args.seed,
        "lr": cfg["lr"],
        "warmup_steps": cfg["warmup_steps"],
        "moco_momentum": cfg["moco_momentum"] if args.method == "moco" else None,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    def on_monitor(step: int, row: dict, state) -> None:
        point = {
            **meta,
            **row,
            "probe_fraction": args.probe_fraction,
            "probe_val_auroc": probe_auroc(module.backbone, data, cfg, args.probe_fraction, cs),
            "wall_s": round(time.monotonic() - start, 1),
        }
        if args.method == "moco":
            point["key_init_share"] = cfg["moco_momentum"] ** step  # weight of the random init left in the key encoder
        with args.out.open("a") as handle:
            handle.write(json.dumps(point) + "\n")
        print(f"{args.dataset} {args.method} step {step}: kNN {row['knn_val_auroc']:.3f} probe {point['probe_val_auroc']:.3f} ({point['wall_s']:.0f} s)", flush=True)

    pretrain(module, data, PretrainSettings.of(cfg), on_monitor)


if __name__ == "__main__":
    main()
