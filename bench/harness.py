"""The measuring harness of the performance suite: timed steps, peak memory, the matrix-multiply
roofline sampled around each measurement, CPU steal, FLOP counts, and the result table."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.runtime import autocast


@dataclass
class Row:
    """One measured path of one workload."""

    workload: str
    model: str
    path: str
    device: str
    images_per_s: float | None
    wall_s: float
    peak_mem_mib: float
    batch: int
    steps: int
    flop_fraction: float | None = None
    tflops: float | None = None
    unit: str = "images/s"
    note: str = ""
    extra: dict = field(default_factory=dict)


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak on a GPU, else the peak resident set
    of this process plus its children (DataLoader workers), sampled every 20 ms. Forked workers
    share pages with the parent, so that sum overstates the per-sample rows with workers."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.02):
            try:
                rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                continue
            self.peak = max(self.peak, rss)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mib(self) -> float:
        return round(self.peak / 2**20, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], None], device: torch.device, min_time: float, warmup: int = 2, max_steps: int = 10_000) -> tuple[int, float]:
    """Run `warmup` steps, then steps until `min_time` seconds have passed; returns (steps, seconds)."""
    for _ in range(warmup):
        step()
    sync(device)
    start, steps = time.perf_counter(), 0
    while steps < max_steps:
        step()
        steps += 1
        if time.perf_counter() - start >= min_time:
            sync(device)
            if time.perf_counter() - start >= min_time:
                break
    sync(device)
    return steps, time.perf_counter() - start


def measure(step: Callable[[], None], device: torch.device, min_time: float, warmup: int) -> tuple[int, float, float]:
    with PeakMemory(device) as memory:
        steps, seconds = timed(step, device, min_time, warmup)
    return steps, seconds, memory.mib


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Measured FLOP/s of a large square matrix product over `seconds`."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    steps, elapsed = timed(lambda: a @ b, device, min_time=seconds, warmup=1)  # one untimed product wakes the thread pool
    return 2 * n**3 * steps / elapsed


class Roofline:
    """Matrix-multiply rates sampled through the run, fp32 and the autocast dtype (the reference of
    fp32 rows, and of autocast rows on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.amp = autocast(device, True).fast_dtype if device.type == "cuda" else torch.float32
        self.samples: dict[str, list[float]] = {"fp32": [], "amp": []}

    def sample(self, seconds: float, kinds: tuple[str, ...] = ("fp32", "amp")) -> dict[str, float]:
        """One measurement of each of `kinds` (FLOP/s), kept for the summary and returned; where
        autocast is fp32 (the CPU) one measurement serves both."""
        if self.amp == torch.float32:
            rate = matmul_rate(self.device, torch.float32, seconds)
            rates = {"fp32": rate, "amp": rate}
        else:
            rates = {kind: matmul_rate(self.device, torch.float32 if kind == "fp32" else self.amp, seconds) for kind in kinds}
        for kind, rate in rates.items():
            self.samples[kind].append(rate)
        return rates

    def peak(self, kind: str) -> float:
        return max(self.samples[kind])

    def summary(self) -> dict[str, object]:
        """Best, median and worst sample (TFLOP/s) and the autocast dtype, for the JSON."""
        spread = {k: [round(f(v) / 1e12, 4) for f in (max, statistics.median, min)] for k, v in self.samples.items()}
        return {"amp_dtype": str(self.amp).removeprefix("torch."), "samples": {k: len(v) for k, v in self.samples.items()}, "best_median_worst_tflops": spread}


def steal_fraction(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two `cpu_steal` readings."""
    if start is None or end is None or end[1] == start[1]:
        return None
    return round((end[0] - start[0]) / (end[1] - start[1]), 4)


def cpu_steal() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat (Linux), or None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def step_flops(step: Callable[[], None]) -> float:
    """Matrix-multiply and convolution FLOPs of one training step (forward + backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table (what README's Speed section quotes)."""
    head = f"{'workload':<10} {'model':<9} {'path':<16} {'rate':>10} {'unit':<15} {'wall s':>7} {'peak MiB':>9} {'TFLOP/s':>8} {'of mm':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        frac = f"{r.flop_fraction:.0%}" if r.flop_fraction is not None else ""
        tf = f"{r.tflops:.3f}" if r.tflops is not None else ""
        rate = f"{r.images_per_s:>10.1f}" if r.images_per_s is not None else f"{'-':>10}"
        lines.append(f"{r.workload:<10} {r.model:<9} {r.path:<16} {rate} {r.unit:<15} {r.wall_s:>7.2f} {r.peak_mem_mib:>9.1f} {tf:>8} {frac:>6}")
    return "\n".join(lines)


def markdown(rows: list[dict], meta: dict) -> str:
    """The rows of a results JSON as a Markdown table, for README."""
    lines = [
        f"{meta.get('gpu') or meta['processor'] or meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']}, "
        f"{meta['dataset']}; measured matmul {meta['matmul_tflops']} TFLOP/s",
        "",
        "| workload | model | path | rate | unit | peak MiB | TFLOP/s | of matmul |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = f"{r['flop_fraction']:.0%}" if r.get("flop_fraction") is not None else ""
        rate = f"{r['wall_s']:.0f} s" if r["unit"] == "-" else f"{r['images_per_s']:,.0f}"
        lines.append(f"| {r['workload']} | {r['model']} | {r['path']} | {rate} | {r['unit']} | {r['peak_mem_mib']:,.0f} | {r.get('tflops') or ''} | {frac} |")
    return "\n".join(lines) + "\n"
