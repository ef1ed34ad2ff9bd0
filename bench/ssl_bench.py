"""SSL pretraining throughput (image pairs per second): our device-resident, batched-augmentation
path against the classic per-sample path (medmnist Dataset + torchvision transforms producing two
views + DataLoader), same model, batch size and optimizer step, in the same process.

    python bench/ssl_bench.py --dataset breastmnist --steps 5 [--device cuda] [--out bench/ssl_bench.json]

Not a test: it prints a table and writes JSON; README's "Speed" section quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import medmnist
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from pipeline import config
from pipeline.augment import two_views
from pipeline.data import load_splits, resolve_root, to_float
from pipeline.models import ModelSpec, build_classifier
from pipeline.runtime import autocast, resolve_device
from pipeline.ssl import build_ssl

ENCODERS = {"smallcnn": ModelSpec("smallcnn"), "resnet18-imagenet-stem": ModelSpec("resnet18", stem="imagenet"),
            "resnet18-cifar-stem": ModelSpec("resnet18", stem="cifar")}


class TwoViews:
    """torchvision's per-sample equivalent of our SSL view, applied twice to a PIL image."""

    def __init__(self) -> None:
        self.view = transforms.Compose([
            transforms.RandomResizedCrop(28, scale=(0.4, 1.0)), transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4)], p=0.8),
            transforms.RandomApply([transforms.GaussianBlur(5, (0.1, 1.5))], p=0.5), transforms.ToTensor(),
        ])

    def __call__(self, image):
        return self.view(image), self.view(image)


def step(module, optimizer, view1, view2, device, amp) -> None:
    with autocast(device, amp):
        loss = module(view1, view2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def ours(module, optimizer, data, batch, steps, device, amp) -> float:
    """Pairs/s of the batched on-device path (after one warm-up step)."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = data.train.images

    def one() -> None:
        index = torch.randint(0, len(data.train), (batch,), device=device)
        step(module, optimizer, *two_views(to_float(images[index]), generator), device, amp)
    return pairs_per_second(one, batch, steps, device)


def per_sample(module, optimizer, dataset_name, root, batch, steps, device, amp, workers) -> float:
    """Pairs/s of the medmnist Dataset + torchvision transforms + DataLoader path."""
    data_class = getattr(medmnist, medmnist.INFO[dataset_name]["python_class"])
    dataset = data_class(split="train", root=str(root), transform=TwoViews(), download=False)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    batches = (item for _ in iter(int, 1) for item in loader)  # endless: epochs one after another

    def one() -> None:
        (view1, view2), _ = next(batches)
        step(module, optimizer, view1.to(device, non_blocking=True), view2.to(device, non_blocking=True), device, amp)
    return pairs_per_second(one, batch, steps, device)


def pairs_per_second(one_step, batch: int, steps: int, device: torch.device) -> float:
    """Time `steps` calls of `one_step` after one warm-up call, synchronising the device."""
    one_step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--encoders", default=",".join(ENCODERS))
    parser.add_argument("--out", default="bench/ssl_bench.json")
    args = parser.parse_args()
    device = resolve_device(args.device)
    amp = device.type == "cuda"
    data = load_splits(args.dataset, 28, args.data_root, device)
    cfg = config.resolve("ssl_pretrain", args.dataset, {})
    rows = []
    for encoder in args.encoders.split(","):
        for method in ("simclr", "moco"):
            result = {"encoder": encoder, "method": method, "device": str(device), "batch": args.batch_size}
            for path in ("ours", "per_sample_w0", "per_sample_w2"):
                torch.manual_seed(0)
                module = build_ssl(method, build_classifier(ENCODERS[encoder]), cfg).to(device)
                optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
                if path == "ours":
                    rate = ours(module, optimizer, data, args.batch_size, args.steps, device, amp)
                else:
                    rate = per_sample(module, optimizer, args.dataset, resolve_root(args.data_root), args.batch_size,
                                      args.steps, device, amp, int(path[-1]))
                result[f"{path}_pairs_per_s"] = round(rate, 1)
            result["speedup_vs_w0"] = round(result["ours_pairs_per_s"] / result["per_sample_w0_pairs_per_s"], 2)
            rows.append(result)
            print(f"{encoder:<24} {method:<7} ours {result['ours_pairs_per_s']:>8.1f} pairs/s   per-sample w0 "
                  f"{result['per_sample_w0_pairs_per_s']:>8.1f}   w2 {result['per_sample_w2_pairs_per_s']:>8.1f}   "
                  f"x{result['speedup_vs_w0']}", flush=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"written {args.out}; machine {meta['machine']}, {meta['cpus']} CPUs, load {meta['load_avg']}")


if __name__ == "__main__":
    main()
