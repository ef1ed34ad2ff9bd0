"""Benchmark (not a test): CPU autocast in bf16 against fp32, on speed and on the metrics.

Speed: two identical models (prepared as the pipeline prepares them: channels_last, its thread
count) take turns on the same batch for `--rounds` rounds, one timing a training step and an
inference pass in fp32, the other under `torch.autocast("cpu", torch.bfloat16)`; the table gives
median times and the median per-round ratio. Metrics: the same seeded training (Adam, the baseline
config's lr, no augmentation) for `--epochs` epochs in each precision, then validation and test
AUROC and NLL, evaluated in the precision it trained in. Usage: `python bench/cpu_bf16.py
[--dataset breastmnist] [--model smallcnn] [--batch 128] [--rounds 8] [--epochs 10] [--out FILE.json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import config, metrics  # noqa: E402
from pipeline.data import DatasetSplits, Split, batch_indices, fold_single, load_splits, to_float  # noqa: E402
from pipeline.models import ModelSpec, build_classifier  # noqa: E402
from pipeline.runtime import configure_speed, prepare_model, seed_everything  # noqa: E402

CPU = torch.device("cpu")


def precision(bf16: bool) -> contextlib.AbstractContextManager:
    """Autocast to bf16 on the CPU, or nothing (fp32)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def fresh(model: str, cfg: dict, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A seeded model prepared as the pipeline prepares it, with its Adam optimizer."""
    seed_everything(seed)
    net = prepare_model(build_classifier(ModelSpec(model)), CPU, cfg)
    return net, torch.optim.Adam(net.parameters(), lr=cfg["lr"])


def step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, bf16: bool) -> None:
    """One training step."""
    net.train()
    with precision(bf16):
        logits = net(images)
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.inference_mode()
def logits_of(net: torch.nn.Module, split: Split, bf16: bool, batch: int = 1024) -> torch.Tensor:
    """Eval-mode logits of a split, in fp32 or under bf16 autocast."""
    net.eval()
    with precision(bf16):
        return torch.cat([net(to_float(chunk)).float() for chunk in split.images.split(batch)])


def speed(args: argparse.Namespace, cfg: dict, data: DatasetSplits) -> dict[str, float]:
    """Median training-step and inference times of fp32 and bf16, in turns on the same batch."""
    images, labels = to_float(data.train.images[: args.batch]), data.train.labels[: args.batch].float()
    nets = {bf16: fresh(args.model, cfg) for bf16 in (False, True)}
    times: dict[str, list[float]] = {key: [] for key in ("train_fp32", "train_bf16", "infer_fp32", "infer_bf16")}
    for bf16, (net, optimizer) in nets.items():  # warm-up: first calls pick kernels
        step(net, optimizer, images, labels, bf16)
        logits_of(net, data.val, bf16)
    for _ in range(args.rounds):
        for bf16, (net, optimizer) in nets.items():
            name = "bf16" if bf16 else "fp32"
            start = time.perf_counter()
            step(net, optimizer, images, labels, bf16)
            times[f"train_{name}"].append(time.perf_counter() - start)
            start = time.perf_counter()
            logits_of(net, data.val, bf16)
            times[f"infer_{name}"].append(time.perf_counter() - start)
    out = {f"{key}_ms": round(1000 * statistics.median(values), 1) for key, values in times.items()}
    for kind in ("train", "infer"):
        ratios = [b / f for f, b in zip(times[f"{kind}_fp32"], times[f"{kind}_bf16"])]
        out[f"{kind}_bf16_over_fp32"] = round(statistics.median(ratios), 3)
    return out


def quality(args: argparse.Namespace, cfg: dict, data: DatasetSplits, bf16: bool) -> dict[str, float]:
    """Validation and test AUROC and NLL after the same seeded training in one precision, and its wall time."""
    net, optimizer = fresh(args.model, cfg)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.Generator().manual_seed(epoch)
        for index in fold_single(list(batch_indices(len(data.train), args.batch, order, CPU))):
            step(net, optimizer, to_float(data.train.images[index]), data.train.labels[index].float(), bf16)
    out = {"train_s": round(time.perf_counter() - start, 1)}
    for split in ("val", "test"):
        logits = logits_of(net, data.split(split), bf16).double().numpy()
        labels = data.split(split).labels.numpy()
        out.update({f"{split}_auroc": round(metrics.auroc(logits, labels), 4), f"{split}_nll": round(metrics.nll_from_logits(logits, labels), 4)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    cfg = config.resolve("baseline", args.dataset, {"model": args.model})
    configure_speed(CPU, False)
    data = load_splits(args.dataset, cfg["size"], args.data_root, CPU)
    report = {
        "meta": {
            "dataset": args.dataset,
            "model": args.model,
            "batch": args.batch,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "speed": speed(args, cfg, data),
    }
    print(json.dumps(report["speed"]), flush=True)
    report["quality"] = {name: quality(args, cfg, data, bf16) for name, bf16 in (("fp32", False), ("bf16", True))}
    for name, values in report["quality"].items():
        print(name, json.dumps(values), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
