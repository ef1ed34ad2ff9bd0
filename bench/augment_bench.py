"""Benchmark (not a test): one augmented epoch of PneumoniaMNIST train, batched on-device vs. per-sample.

Batched: the split as one uint8 tensor, index batches of 128, `geometric+intensity` preset (flip,
affine, brightness/contrast jitter, blur, noise) with per-sample parameters. Per-sample: medmnist's
`PneumoniaMNIST` Dataset with the equivalent torchvision transforms (RandomHorizontalFlip,
RandomAffine, ColorJitter, GaussianBlur, ToTensor) in a DataLoader (batch 128, shuffle), for each
`--workers` value. Same machine, same process. Prints a table and writes JSON (bench/*.json is
gitignored). Usage: `python bench/augment_bench.py [--repeats 3] [--workers 0,2] [--device cpu] [--threads 1]`.
DataLoader workers always run single-threaded; `--threads` sets the main process's torch threads.
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
from typing import Callable

import medmnist
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.augment import build_augment  # noqa: E402
from pipeline.data import batch_indices, to_float  # noqa: E402
from pipeline.runtime import resolve_device  # noqa: E402
from pipeline.synthetic import write_synthetic  # noqa: E402

TRAIN_SIZE = 4708  # PneumoniaMNIST train images at 28 px
PRESET = "geometric+intensity"


def data_root() -> tuple[Path, str]:
    """The real files when $MEDMNIST_ROOT holds them, else synthetic ones."""
    candidate = os.environ.get("MEDMNIST_ROOT")
    if candidate and (Path(candidate) / "pneumoniamnist.npz").exists():
        return Path(candidate), "real"
    root = Path(tempfile.mkdtemp(prefix="augment-bench-"))
    write_synthetic(root, "pneumoniamnist", counts={"train": TRAIN_SIZE, "val": 8, "test": 8})
    return root, "synthetic"


def classic_transform() -> transforms.Compose:
    """torchvision per-sample equivalent of the `geometric+intensity` preset (PIL in, tensor out)."""
    return transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1)),
            transforms.RandomApply([transforms.ColorJitter(brightness=0.2, contrast=0.2)], p=0.8),
            transforms.RandomApply([transforms.GaussianBlur(kernel_size=11, sigma=(0.1, 1.5))], p=0.2),
            transforms.ToTensor(),
        ]
    )


def time_epochs(epoch: Callable[[int], int], repeats: int) -> list[float]:
    """Wall seconds of `repeats` epochs (each returns the number of images it produced)."""
    seconds = []
    for repeat in range(repeats):
        start = time.perf_counter()
        count = epoch(repeat)
        seconds.append(time.perf_counter() - start)
        assert count == TRAIN_SIZE, f"an epoch produced {count} images, expected {TRAIN_SIZE}"
    return seconds


def batched_epoch(images: torch.Tensor, batch_size: int) -> Callable[[int], int]:
    """One epoch of the batched path: permutation, uint8 → float, augment, on `images.device`."""
    augment = build_augment(PRESET)

    def epoch(seed: int) -> int:
        generator = torch.Generator(device=images.device).manual_seed(seed)
        count = 0
        for index in batch_indices(len(images), batch_size, torch.Generator().manual_seed(seed)):
            batch = augment(to_float(images[index.to(images.device)]), generator)
            count += batch.shape[0]
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        return count

    return epoch


def classic_epoch(root: Path, batch_size: int, workers: int) -> Callable[[int], int]:
    """One epoch of the per-sample path: medmnist Dataset + torchvision transforms in a DataLoader."""
    dataset = medmnist.PneumoniaMNIST(split="train", root=str(root), transform=classic_transform(), download=False)

    def epoch(seed: int) -> int:
        torch.manual_seed(seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
        return sum(images.shape[0] for images, _ in loader)

    return epoch


def main() -> None:
    """Run both paths, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", default="0,2", help="DataLoader num_workers values, comma-separated.")
    parser.add_argument("--device", default="cpu", help="Device of the batched path: cpu | cuda | auto.")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default).")
    parser.add_argument("--out", default="", help="JSON path (default bench/augment_bench_threads<N>.json).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or REPO / "bench" / f"augment_bench_threads{torch.get_num_threads()}.json")

    root, source = data_root()
    device = resolve_device(args.device)
    train = medmnist.PneumoniaMNIST(split="train", root=str(root), download=False)
    images = torch.from_numpy(train.imgs).unsqueeze(1).to(device)
    rows = [{"path": f"batched ({device.type})", "workers": "-", "seconds": time_epochs(batched_epoch(images, args.batch_size), args.repeats)}]
    for workers in (int(w) for w in args.workers.split(",")):
        rows.append({"path": "per-sample DataLoader", "workers": workers, "seconds": time_epochs(classic_epoch(root, args.batch_size, workers), args.repeats)})
    reference = statistics.median(rows[0]["seconds"])
    for row in rows:
        row["median_s"] = statistics.median(row["seconds"])
        row["images_per_s"] = TRAIN_SIZE / row["median_s"]
        row["slowdown_vs_batched"] = row["median_s"] / reference
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1m": os.getloadavg()[0],
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }
    print(
        f"one augmented epoch of PneumoniaMNIST train ({TRAIN_SIZE} images, 28 px, {source} data), "
        f"batch {args.batch_size}, median of {args.repeats}; {machine['cpu_count']} CPUs, "
        f"{machine['torch_threads']} torch threads, load {machine['load_average_1m']:.1f}"
    )
    print(f"{'path':<24} {'workers':>7} {'s/epoch':>9} {'images/s':>10} {'x batched':>10}")
    for row in rows:
        print(f"{row['path']:<24} {row['workers']!s:>7} {row['median_s']:>9.3f} {row['images_per_s']:>10.0f} {row['slowdown_vs_batched']:>10.1f}")
    out.write_text(json.dumps({"data": source, "preset": PRESET, "machine": machine, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
