"""Performance suite (not a test): throughput of every loop of the study, side by side with the
classic per-sample path and with each of our speed features switched off in turn, in one process.

For supervised training, SSL pretraining (SimCLR, MoCo), feature extraction and linear probing
(and, with --study, whole studies of a profile, several datasets at once) it prints one table and
writes it as JSON: images/s (image pairs/s for SSL), wall time, peak memory, device, and for the training loops the
achieved FLOP rate as a fraction of the matrix-multiply rate measured in the same run. The matmul
rate is sampled right before and right after every training measurement and their mean is that
measurement's reference: on a shared (virtual) machine the rate drifts by a third within minutes,
and a reference taken at another moment would credit or blame the loop for its neighbours' load.

    python bench/perf.py [--device auto] [--dataset pneumoniamnist] [--models smallcnn,resnet18]
                         [--min-time 3] [--compile resnet18/simclr] [--study] [--out bench/results/perf-cpu.json]
    python bench/perf.py --workloads none --study --study-profile full --study-dataset breastmnist,pneumoniamnist [--study-store DIR]

Paths per training workload:
  ours               device-resident uint8 data, batched on-device augmentation, channels_last,
                     no host sync per step, autocast (bf16; fp16 before Ampere) + cuDNN autotuning on CUDA
  pipeline epoch     the shipped epoch function (pipeline.train.train_epoch / an epoch of pretrain.StepTrainer steps)
  -<feature>         ours with that one feature switched off
  +compile           ours with the encoder under torch.compile (--compile model/workload)
  per-sample wN      medmnist Dataset + torchvision transforms + DataLoader(num_workers=N), as in
                     MedMNIST's official training script (N=0), same model, batch and optimizer
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import medmnist  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torchvision import transforms  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import config  # noqa: E402
from pipeline.augment import SSL_VIEW, build_augment  # noqa: E402
from pipeline.data import DatasetSplits, load_splits, resolve_root, to_float  # noqa: E402
from pipeline.features import extract_features  # noqa: E402
from pipeline.models import ModelSpec, build_classifier  # noqa: E402
from pipeline.pretrain import StepTrainer, epoch_views  # noqa: E402
from pipeline.probe import fit_linear_head  # noqa: E402
from pipeline.runtime import autocast, configure_speed, cpu_threads, grad_scaler, prepare_model, resolve_device  # noqa: E402
from pipeline.ssl import build_ssl  # noqa: E402
from pipeline.train import train_epoch  # noqa: E402

MODELS = {"smallcnn": ModelSpec("smallcnn"), "resnet18": ModelSpec("resnet18", stem="cifar")}
SUPERVISED_AUGMENT = "flip"
TRAINING_WORKLOADS = ("supervised", "simclr", "moco")


@dataclass
class Features:
    """Our speed features; a path switches exactly one of them off."""

    resident: bool = True
    batched_aug: bool = True
    channels_last: bool = True
    no_sync: bool = True
    amp: bool = True
    cudnn_benchmark: bool = True
    threads: bool = True
    compile: bool = False


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
        return {"amp_dtype": str(self.amp).removeprefix("torch."), "samples": {k: len(v) for k, v in self.samples.items()},
                "best_median_worst_tflops": spread}


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


def index_stream(n: int, batch: int, device: torch.device, count: int = 256) -> Iterator[torch.Tensor]:
    """Endless random index batches, generated on the CPU and moved to `device` `count` at a time."""
    generator = torch.Generator().manual_seed(0)
    while True:
        yield from torch.randint(0, n, (count, batch), generator=generator).to(device).unbind(0)


class Loop:
    """Our training step for one workload, with any single speed feature switched off."""

    def __init__(self, workload: str, spec: ModelSpec, data: DatasetSplits, batch: int, device: torch.device, feats: Features):
        self.workload, self.device, self.feats, self.batch = workload, device, feats, batch
        torch.manual_seed(0)
        model = build_classifier(spec)
        cfg = {"channels_last": feats.channels_last, "compile": feats.compile}
        if workload != "supervised":
            model = build_ssl(workload, model, config.resolve("ssl_pretrain", data.name, {}))
        self.module = prepare_model(model, device, cfg)
        self.optimizer = torch.optim.Adam([p for p in self.module.parameters() if p.requires_grad], lr=1e-3)
        home = device if feats.resident else torch.device("cpu")
        self.images, self.labels = data.train.images.to(home), data.train.labels.to(home)
        self.indices = index_stream(len(self.images), batch, home)
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.augment = build_augment(SUPERVISED_AUGMENT) if workload == "supervised" else SSL_VIEW
        self.amp = feats.amp and device.type == "cuda"
        self.scaler = grad_scaler(device, self.amp)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        if self.feats.batched_aug:
            return self.augment(x, self.generator)
        return torch.cat([self.augment(image[None], self.generator) for image in x])

    def __call__(self) -> None:
        index = next(self.indices)
        x = to_float(self.images[index].to(self.device, non_blocking=True))
        with autocast(self.device, self.amp):
            if self.workload == "supervised":
                target = self.labels[index].to(self.device, non_blocking=True).float()
                loss = F.binary_cross_entropy_with_logits(self.module(self.view(x)).float(), target)
            else:
                loss = self.module(self.view(x), self.view(x), index)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not self.feats.no_sync:
            loss.item()


def pipeline_epoch(workload: str, spec: ModelSpec, data: DatasetSplits, batch: int, device: torch.device) -> Callable[[], None]:
    """One epoch of the shipped loop (train_epoch, or StepTrainer steps over epoch_views) with our settings."""
    torch.manual_seed(0)
    model = build_classifier(spec)
    fast = {"channels_last": True, "compile": False}
    if workload == "supervised":
        model = prepare_model(model, device, fast)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        augment = build_augment(SUPERVISED_AUGMENT)
        return lambda: train_epoch(model, data.train, optimizer, augment, batch, 0, device.type == "cuda", "bench")
    cfg = {**config.resolve("ssl_pretrain", data.name, {}), "method": workload, "batch_size": batch, "amp": True,
           "warmup_steps": 1}
    module = prepare_model(build_ssl(workload, model, cfg), device, fast)
    trainer = StepTrainer(module, cfg, 10**9, device)
    return lambda: [trainer.step(*views[1:], views[0]) for views in epoch_views(data.train.images, cfg, 1)]


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


def medmnist_train(dataset: str, root: Path, transform) -> torch.utils.data.Dataset:
    """The training split as medmnist's own Dataset, applying `transform` to one PIL image at a time."""
    data_class = getattr(medmnist, medmnist.INFO[dataset]["python_class"])
    return data_class(split="train", root=str(root), transform=transform, download=False)


def medmnist_loader(dataset: str, root: Path, transform, batch: int, workers: int, device: torch.device) -> Iterator:
    """The official script's input path: medmnist Dataset, per-sample transforms, shuffled DataLoader."""
    loader = DataLoader(medmnist_train(dataset, root, transform), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    while True:
        yield from loader


def per_sample_step(workload: str, spec: ModelSpec, dataset: str, root: Path, batch: int, workers: int,
                    device: torch.device) -> Callable[[], None]:
    """A training step fed by the per-sample path; same model, optimizer and autocast as ours (MoCo
    without own-key masking: a DataLoader batch carries no image indices; the mask is one N×K compare)."""
    torch.manual_seed(0)
    model = build_classifier(spec)
    amp = device.type == "cuda"
    scaler = grad_scaler(device, amp)
    if workload == "supervised":
        transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()])
        module = model.to(device)
    else:
        transform = TwoViews()
        module = build_ssl(workload, model, config.resolve("ssl_pretrain", dataset, {})).to(device)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    batches = medmnist_loader(dataset, root, transform, batch, workers, device)

    def step() -> None:
        x, y = next(batches)
        with autocast(device, amp):
            if workload == "supervised":
                loss = F.binary_cross_entropy_with_logits(module(x.to(device)).float(), y.to(device).float().view(-1))
            else:
                loss = module(x[0].to(device, non_blocking=True), x[1].to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()

    return step


def ablations(device: torch.device, compile_too: bool) -> list[tuple[str, Features]]:
    """Our path, then each feature off in turn (only those that exist on this device)."""
    paths = [("ours", Features()), ("-batched_aug", Features(batched_aug=False)), ("-channels_last", Features(channels_last=False))]
    if device.type == "cuda":
        paths += [("-resident", Features(resident=False)), ("-no_sync", Features(no_sync=False)),
                  ("-amp", Features(amp=False)), ("-cudnn_benchmark", Features(cudnn_benchmark=False))]
    elif (os.cpu_count() or 1) != cpu_threads():
        paths.append(("-threads", Features(threads=False)))
    if compile_too:
        paths.append(("+compile", Features(compile=True)))
    return paths


def apply_globals(feats: Features, device: torch.device) -> None:
    """Settings that live outside the model: cuDNN autotuning and the CPU thread count."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = feats.cudnn_benchmark
    else:
        torch.set_num_threads(cpu_threads() if feats.threads else os.cpu_count() or 1)


def measure(step: Callable[[], None], device: torch.device, min_time: float, warmup: int) -> tuple[int, float, float]:
    with PeakMemory(device) as memory:
        steps, seconds = timed(step, device, min_time, warmup)
    return steps, seconds, memory.mib


def training_rows(workload: str, name: str, data: DatasetSplits, args, device: torch.device, roofline: Roofline) -> list[Row]:
    """Every path of one training workload (supervised, simclr or moco) for one model.

    Paths are measured `--repeats` times, alternating forward and reverse order so warm-up and
    clock drift do not favour any path; each row keeps its best rate and lists all of them, with
    the matmul reference measured around each (`extra.references`, TFLOP/s, in the path's dtype
    under the default settings) and the FLOP fraction of the kept one.
    """
    spec, batch = MODELS[name], args.batch if workload == "supervised" else args.ssl_batch
    unit = "images/s" if workload == "supervised" else "pairs/s"
    root = resolve_root(args.data_root)
    n_epoch = len(data.train) - (len(data.train) % batch if workload != "supervised" and len(data.train) > batch else 0)
    paths: list[tuple[str, Features, Callable[[], Callable[[], None]], int, int, str]] = [
        (path, feats, lambda feats=feats: Loop(workload, spec, data, batch, device, feats), batch,
         10 if feats.compile else args.warmup, "")
        for path, feats in ablations(device, f"{name}/{workload}" in args.compile.split(","))
    ]
    paths.append(("pipeline epoch", Features(), lambda: pipeline_epoch(workload, spec, data, batch, device), n_epoch, 1,
                  "the shipped epoch function"))
    paths += [(f"per-sample w{w}", Features(), lambda w=w: per_sample_step(workload, spec, args.dataset, root, batch, w, device),
               batch, args.warmup, "medmnist Dataset + torchvision transforms + DataLoader") for w in args.workers]
    flops = step_flops(paths[0][2]())
    flops_per_image = flops / batch
    best: dict[str, Row] = {}
    sample_seconds = args.matmul_seconds or (0.2 if device.type == "cuda" else 0.5)  # a GPU's rate is steady; a shared CPU's drifts
    for repeat in range(args.repeats):
        for path, feats, build, per_step, warmup, note in (paths if repeat % 2 == 0 else paths[::-1]):
            kind = "fp32" if device.type != "cuda" or not feats.amp else "amp"
            before = roofline.sample(sample_seconds, (kind,))[kind]
            apply_globals(feats, device)
            steps, seconds, mib = measure(build(), device, args.min_time, warmup)
            apply_globals(Features(), device)
            reference = (before + roofline.sample(sample_seconds, (kind,))[kind]) / 2
            rate = per_step * steps / seconds
            row = best.get(path) or Row(workload, name, path, str(device), 0.0, 0.0, 0.0, batch, 0, unit=unit, note=note,
                                        extra={"rates": [], "references": [], "flops_per_image": flops_per_image})
            row.extra["rates"].append(round(rate, 1))
            row.extra["references"].append(round(reference / 1e12, 4))
            if rate > row.images_per_s:
                row.images_per_s, row.wall_s, row.peak_mem_mib, row.steps = round(rate, 1), round(seconds, 2), mib, steps
                row.tflops = round(flops_per_image * rate / 1e12, 3)
                row.flop_fraction = round(flops_per_image * rate / reference, 3)
            best[path] = row
            print(f"  {workload:<10} {name:<9} {path:<16} {rate:>10.1f} {unit}", flush=True)
    return [best[path] for path, *_ in paths]


def feature_rows(name: str, data: DatasetSplits, args, device: torch.device) -> list[Row]:
    """Frozen-encoder features of the training split: ours vs. a per-sample DataLoader in batches of 128."""
    rows = []
    model = prepare_model(build_classifier(MODELS[name]), device, {"channels_last": True}).eval()
    n = len(data.train)

    def add(path: str, step: Callable[[], None], note: str = "") -> None:
        steps, seconds, mib = measure(step, device, args.min_time, 1)
        rows.append(Row("features", name, path, str(device), round(n * steps / seconds, 1), round(seconds, 2), mib,
                        args.eval_batch, steps, note=note))
        print(f"  {'features':<10} {name:<9} {path:<16} {rows[-1].images_per_s:>10.1f} images/s", flush=True)

    plain = build_classifier(MODELS[name]).to(device).eval()
    add("ours", lambda: extract_features(model, data.train, args.eval_batch, amp=True))
    add("-channels_last", lambda: extract_features(plain, data.train, args.eval_batch, amp=True))
    dataset = medmnist_train(args.dataset, resolve_root(args.data_root), transforms.ToTensor())

    @torch.no_grad()
    def per_sample() -> None:
        for x, _ in DataLoader(dataset, batch_size=128, num_workers=0):
            plain.features(x.to(device)).float().cpu()

    add("per-sample w0", per_sample, note="DataLoader batches of 128, no_grad, features copied to the host per batch")
    return rows


def probe_rows(name: str, data: DatasetSplits, args, device: torch.device) -> list[Row]:
    """One linear probe on the full training split: cached features + L-BFGS logistic regression over
    the C grid (ours) vs. a linear head trained by Adam through the frozen encoder (--probe-epochs)."""
    model = prepare_model(build_classifier(MODELS[name]), device, {"channels_last": True}).eval()
    cs = config.resolve("linear_probe", data.name, {})["probe_cs"]
    labels = {s: data.split(s).labels.cpu().numpy() for s in ("train", "val")}
    n, rows = len(data.train), []

    def ours() -> None:
        feats = {s: extract_features(model, data.split(s), args.eval_batch, amp=True).cpu().numpy() for s in ("train", "val")}
        fit_linear_head(feats["train"], labels["train"], feats["val"], labels["val"], cs, 0)

    def classic() -> None:
        head = torch.nn.Linear(model.feat_dim, 1).to(device)
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
        batches = medmnist_loader(args.dataset, resolve_root(args.data_root), transforms.ToTensor(), 128, 0, device)
        for _ in range(args.probe_epochs * (n // 128)):
            x, y = next(batches)
            with torch.no_grad():
                feats = model.features(x.to(device))
            loss = F.binary_cross_entropy_with_logits(head(feats.float()).squeeze(1), y.to(device).float().view(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    for path, step, note in (("ours", ours, f"features once + logistic regression over {len(cs)} C values"),
                             ("per-sample w0", classic, f"frozen encoder + linear head, Adam, {args.probe_epochs} epochs of DataLoader")):
        steps, seconds, mib = measure(step, device, args.min_time, 0)
        rows.append(Row("probe", name, path, str(device), round(n * steps / seconds, 1), round(seconds, 2), mib,
                        n, steps, unit="train images/s", note=note))
        print(f"  {'probe':<10} {name:<9} {path:<16} {rows[-1].images_per_s:>10.1f} labelled images/s", flush=True)
    return rows


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
                command = [sys.executable, "-m", "entrypoints.study", "--dataset", dataset, "--profile", args.study_profile,
                           "--data-root", data_root, "--out", f"{tmp}/reports"]
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
        note = (f"{args.study_profile} profile, {dataset}, {store}" + (f", {len(datasets)} studies at once" if len(datasets) > 1 else "")
                + ("" if code == 0 else f"; FAILED rc={code}, see {logs}-{dataset}.log"))
        rows.append(Row("study", "-", f"{args.study_profile} {dataset}", str(device), None, round(ended[dataset], 1), memory.mib, 0, 1,
                        unit="-", note=note + " (peak = host memory of this benchmark's process tree, all studies together)",
                        extra={"returncode": code}))
        print(f"  {'study':<10} {'-':<9} {dataset:<16} {ended[dataset]:>10.1f} s" + ("" if code == 0 else f"  FAILED rc={code}"), flush=True)
    if len(datasets) > 1:
        rows.append(Row("study", "-", f"{args.study_profile} all", str(device), None, round(max(ended.values()), 1), memory.mib, 0, 1,
                        unit="-", note=f"{args.study_profile} profile, {'+'.join(datasets)} at once; wall time until the last finished"))
    return rows


def reap(proc: subprocess.Popen) -> None:
    """Stop a study subprocess still running when the benchmark ends early (error, Ctrl-C)."""
    if proc.poll() is None:
        proc.terminate()
        proc.wait()


def table(rows: list[Row]) -> str:
    """The rows as an aligned text table (what README's Speed section quotes)."""
    head = f"{'workload':<10} {'model':<9} {'path':<16} {'rate':>10} {'unit':<15} {'wall s':>7} {'peak MiB':>9} {'TFLOP/s':>8} {'of mm':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        frac = f"{r.flop_fraction:.0%}" if r.flop_fraction is not None else ""
        tf = f"{r.tflops:.3f}" if r.tflops is not None else ""
        rate = f"{r.images_per_s:>10.1f}" if r.images_per_s is not None else f"{'-':>10}"
        lines.append(f"{r.workload:<10} {r.model:<9} {r.path:<16} {rate} {r.unit:<15} {r.wall_s:>7.2f} "
                     f"{r.peak_mem_mib:>9.1f} {tf:>8} {frac:>6}")
    return "\n".join(lines)


def markdown(rows: list[dict], meta: dict) -> str:
    """The rows of a results JSON as a Markdown table, for README."""
    lines = [f"{meta.get('gpu') or meta['processor'] or meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']}, "
             f"{meta['dataset']}; measured matmul {meta['matmul_tflops']} TFLOP/s", "",
             "| workload | model | path | rate | unit | peak MiB | TFLOP/s | of matmul |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = f"{r['flop_fraction']:.0%}" if r.get("flop_fraction") is not None else ""
        rate = f"{r['wall_s']:.0f} s" if r["unit"] == "-" else f"{r['images_per_s']:,.0f}"
        lines.append(f"| {r['workload']} | {r['model']} | {r['path']} | {rate} | {r['unit']} | {r['peak_mem_mib']:,.0f} | "
                     f"{r.get('tflops') or ''} | {frac} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default="pneumoniamnist", help="data of the loop rows")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--models", default="smallcnn,resnet18", help=f"comma list of {', '.join(MODELS)} (resnet18 = CIFAR stem)")
    parser.add_argument("--workloads", default="supervised,simclr,moco,features,probe")
    parser.add_argument("--batch", type=int, default=128, help="supervised batch (the baseline default)")
    parser.add_argument("--ssl-batch", type=int, default=256, help="SSL batch in image pairs (the ssl_pretrain default)")
    parser.add_argument("--eval-batch", type=int, default=1024)
    parser.add_argument("--probe-epochs", type=int, default=10, help="epochs of the classic linear-probe reference")
    parser.add_argument("--workers", default="0,2", help="DataLoader workers of the per-sample reference paths")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds each path is timed for (at least)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each path")
    parser.add_argument("--matmul-seconds", type=float, default=0.0, help="length of each matmul sample around a "
                        "training measurement (default 0.2 s on CUDA, 0.5 s on the CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each training path (best kept)")
    parser.add_argument("--compile", default="", help="model/workload pairs also measured under torch.compile, "
                        "e.g. resnet18/simclr (compiling takes a minute each)")
    parser.add_argument("--study", action="store_true", help="also time a whole study (subprocess, fresh store)")
    parser.add_argument("--study-dataset", default="breastmnist", help="comma list: the studies run at once")
    parser.add_argument("--study-profile", default="quick")
    parser.add_argument("--study-store", default="", help="folder of the studies' tracking store, kept and reused "
                        "across calls (default: a fresh temporary store)")
    parser.add_argument("--out", default="")
    parser.add_argument("--render", default="", help="print an earlier results JSON as a Markdown table and exit")
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(args.render).read_text())
        print(markdown(report["rows"], report["meta"]), end="")
        return
    args.workers = [int(w) for w in args.workers.split(",") if w != ""]
    device = resolve_device(args.device)
    configure_speed(device)
    steal_start = cpu_steal()
    workloads = args.workloads.split(",")
    roofline = Roofline(device)
    # Training rows are held to samples taken around each of them; the initial ones set the printed
    # peak, so a study-only timing (`--workloads none`) takes just one, for the record.
    for _ in range(3 if set(TRAINING_WORKLOADS) & set(workloads) else 1):
        roofline.sample(2.0)
    print(f"device {device}; measured matmul: fp32 {roofline.peak('fp32') / 1e12:.3f} TFLOP/s"
          + (f" (TF32), {roofline.amp} {roofline.peak('amp') / 1e12:.1f} TFLOP/s" if device.type == "cuda"
             else f" ({torch.get_num_threads()} threads)"), flush=True)
    data = load_splits(args.dataset, 28, args.data_root, device)
    rows: list[Row] = []
    for name in args.models.split(","):
        for workload in TRAINING_WORKLOADS:
            if workload in workloads:
                rows += training_rows(workload, name, data, args, device, roofline)
        if "features" in workloads:
            rows += feature_rows(name, data, args, device)
        if "probe" in workloads:
            rows += probe_rows(name, data, args, device)
    out = Path(args.out or f"bench/results/perf-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.study:
        rows += study_rows(args, device, out.with_suffix(""))
    steal_end = cpu_steal()
    meta = {
        "machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "dataset": args.dataset,
        "matmul_tflops": {k: round(roofline.peak(k) / 1e12, 4) for k in ("fp32", "amp")}, "matmul": roofline.summary(),
        "load_avg": os.getloadavg(), "cpu_steal": steal_fraction(steal_start, steal_end),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\n{table(rows)}\n\nmatmul roofline: {meta['matmul_tflops']} TFLOP/s; {meta['gpu'] or meta['processor'] or meta['machine']}, "
          f"{meta['cpus']} CPUs, torch {meta['torch']}; written {out}")
    if failed := [r.path for r in rows if r.extra.get("returncode")]:
        sys.exit(f"perf: study failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
