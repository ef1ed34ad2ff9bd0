"""Benchmark (not a test): what MoCo's shuffling BN (`bn_splits`) costs per training step.

Two MoCo modules, identical but for `bn_splits` (1 = plain batch norm, and the value asked for),
take turns on the same batch (random 28-px images, two views) for `--rounds` rounds, so drift in
the machine's speed hits both alike; each round times one optimizer step of each, and the table
reports the median step time and the median per-round ratio. On the CPU a split runs one batch
norm per chunk, elsewhere one batch norm over chunks folded into channels (`pipeline/ssl.py`).
Usage: `python bench/split_bn_cost.py [--models smallcnn,resnet18] [--batch 256] [--splits 8]
[--rounds 15] [--device auto] [--out FILE.json]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import sync  # noqa: E402
from pipeline import config  # noqa: E402
from pipeline.models import ModelSpec, build_classifier  # noqa: E402
from pipeline.runtime import autocast, configure_speed, prepare_model, resolve_device  # noqa: E402
from pipeline.ssl import MoCo, build_ssl  # noqa: E402


def moco(model: str, splits: int, device: torch.device, cfg: dict) -> tuple[MoCo, torch.optim.Optimizer]:
    """A MoCo module with the ssl_pretrain defaults but `bn_splits`, prepared as the pipeline prepares it."""
    torch.manual_seed(0)
    module = prepare_model(build_ssl("moco", build_classifier(ModelSpec(model)), {**cfg, "bn_splits": splits}), device, cfg)
    return module, torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=cfg["lr"])


def step_seconds(module: MoCo, optimizer: torch.optim.Optimizer, views: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor, device: torch.device, amp: bool) -> float:
    """Wall time of one optimizer step (the device synchronised before and after)."""
    sync(device)
    start = time.perf_counter()
    with autocast(device, amp):
        loss = module(*views, ids)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    sync(device)
    return time.perf_counter() - start


def measure(model: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Median step times with plain and split batch norm, taking turns, and their median ratio."""
    cfg = config.resolve("ssl_pretrain", "breastmnist", {"device": args.device, "batch_size": args.batch})
    plain, split = moco(model, 1, device, cfg), moco(model, args.splits, device, cfg)
    generator = torch.Generator().manual_seed(0)
    views = tuple(torch.rand(args.batch, 1, 28, 28, generator=generator).to(device) for _ in range(2))
    if cfg["channels_last"]:
        views = tuple(v.contiguous(memory_format=torch.channels_last) for v in views)
    ids = torch.arange(args.batch, device=device)
    for module, optimizer in (plain, split):
        for _ in range(args.warmup):
            step_seconds(module, optimizer, views, ids, device, cfg["amp"])
    times = {"plain": [], "split": []}
    for _ in range(args.rounds):
        times["plain"].append(step_seconds(*plain, views, ids, device, cfg["amp"]))
        times["split"].append(step_seconds(*split, views, ids, device, cfg["amp"]))
    ratios = [s / p for p, s in zip(times["plain"], times["split"])]
    return {
        "model": model,
        "batch": args.batch,
        "splits": args.splits,
        "plain_ms": 1000 * statistics.median(times["plain"]),
        "split_ms": 1000 * statistics.median(times["split"]),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smallcnn,resnet18")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--splits", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = resolve_device(args.device)
    configure_speed(device)
    rows = [measure(model, args, device) for model in args.models.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"MoCo step, plain vs. shuffling BN ({args.splits} chunks), batch {args.batch}, {name}, {args.rounds} rounds")
    print("| encoder | plain BN (ms) | split BN (ms) | split / plain (median, range) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['plain_ms']:.1f} | {r['split_ms']:.1f} | {r['ratio']:.2f} ({r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f}) |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
