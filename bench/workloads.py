"""The workloads the performance suite measures: our training step with each speed feature
switched off in turn, the shipped epoch, the classic per-sample path (medmnist Dataset +
torchvision transforms + DataLoader), feature extraction and linear probing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import medmnist
import torch
import torch.nn.functional as F
from harness import Roofline, Row, measure, step_flops
from torch.utils.data import DataLoader
from torchvision import transforms

from pipeline import config
from pipeline.augment import SSL_VIEW, build_augment
from pipeline.data import DatasetSplits, resolve_root, to_float
from pipeline.features import extract_features
from pipeline.models import ModelSpec, build_classifier
from pipeline.pretrain import PretrainSettings, StepTrainer, epoch_views
from pipeline.probe import fit_linear_head
from pipeline.runtime import autocast, cpu_threads, grad_scaler, prepare_model
from pipeline.ssl import build_ssl
from pipeline.train import train_epoch, train_step


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


def index_stream(n: int, batch: int, device: torch.device, count: int = 256) -> Iterator[torch.Tensor]:
    """Endless random index batches, generated on the CPU and moved to `device` `count` at a time."""
    generator = torch.Generator().manual_seed(0)
    while True:
        yield from torch.randint(0, n, (count, batch), generator=generator).to(device).unbind(0)


class Loop:
    """The pipeline's training step for one workload (`train.train_step`, `pretrain.StepTrainer.step`),
    fed by our input path with any single speed feature switched off."""

    def __init__(self, workload: str, spec: ModelSpec, data: DatasetSplits, batch: int, device: torch.device, feats: Features):
        self.workload, self.device, self.feats, self.batch = workload, device, feats, batch
        torch.manual_seed(0)
        model = build_classifier(spec)
        cfg = {"channels_last": feats.channels_last, "compile": feats.compile}
        if workload != "supervised":
            model = build_ssl(workload, model, config.resolve("ssl_pretrain", data.name, {}))
        self.module = prepare_model(model, device, cfg)
        home = device if feats.resident else torch.device("cpu")
        self.images, self.labels = data.train.images.to(home), data.train.labels.to(home)
        self.indices = index_stream(len(self.images), batch, home)
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.augment = build_augment(SUPERVISED_AUGMENT) if workload == "supervised" else SSL_VIEW
        self.amp = feats.amp and device.type == "cuda"
        if workload == "supervised":
            self.optimizer = torch.optim.Adam([p for p in self.module.parameters() if p.requires_grad], lr=1e-3)
            self.scaler, self.loss_fn = grad_scaler(device, self.amp), torch.nn.BCEWithLogitsLoss(reduction="sum")
        else:
            ssl_cfg = {**config.resolve("ssl_pretrain", data.name, {}), "lr": 1e-3, "warmup_steps": 1, "amp": self.amp}
            self.trainer = StepTrainer(self.module, PretrainSettings.of(ssl_cfg), 10**9, device)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        if self.feats.batched_aug:
            return self.augment(x, self.generator)
        return torch.cat([self.augment(image[None], self.generator) for image in x])

    def __call__(self) -> None:
        index = next(self.indices)
        x = to_float(self.images[index].to(self.device, non_blocking=True))
        if self.workload == "supervised":
            target = self.labels[index].to(self.device, non_blocking=True).float()
            loss = train_step(self.module, self.view(x), target, self.optimizer, self.scaler, self.amp, self.loss_fn)
        else:
            loss = self.trainer.step(self.view(x), self.view(x), index.to(self.device))
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
    cfg = {**config.resolve("ssl_pretrain", data.name, {}), "method": workload, "batch_size": batch, "amp": True, "warmup_steps": 1}
    module = prepare_model(build_ssl(workload, model, cfg), device, fast)
    settings = PretrainSettings.of(cfg)
    trainer = StepTrainer(module, settings, 10**9, device)
    return lambda: [trainer.step(*views[1:], views[0]) for views in epoch_views(data.train.images, settings, 1)]


class TwoViews:
    """torchvision's per-sample equivalent of our SSL view, applied twice to a PIL image."""

    def __init__(self) -> None:
        self.view = transforms.Compose(
            [
                transforms.RandomResizedCrop(28, scale=(0.4, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4)], p=0.8),
                transforms.RandomApply([transforms.GaussianBlur(5, (0.1, 1.5))], p=0.5),
                transforms.ToTensor(),
            ]
        )

    def __call__(self, image):
        return self.view(image), self.view(image)


def medmnist_train(dataset: str, root: Path, transform) -> torch.utils.data.Dataset:
    """The training split as medmnist's own Dataset, applying `transform` to one PIL image at a time."""
    data_class = getattr(medmnist, medmnist.INFO[dataset]["python_class"])
    return data_class(split="train", root=str(root), transform=transform, download=False)


def medmnist_loader(dataset: str, root: Path, transform, batch: int, workers: int, device: torch.device) -> Iterator:
    """The official script's input path: medmnist Dataset, per-sample transforms, shuffled DataLoader."""
    loader = DataLoader(
        medmnist_train(dataset, root, transform),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    while True:
        yield from loader


def per_sample_step(workload: str, spec: ModelSpec, dataset: str, root: Path, batch: int, workers: int, device: torch.device) -> Callable[[], None]:
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
        paths += [
            ("-resident", Features(resident=False)),
            ("-no_sync", Features(no_sync=False)),
            ("-amp", Features(amp=False)),
            ("-cudnn_benchmark", Features(cudnn_benchmark=False)),
        ]
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
        (path, feats, lambda feats=feats: Loop(workload, spec, data, batch, device, feats), batch, 10 if feats.compile else args.warmup, "")
        for path, feats in ablations(device, f"{name}/{workload}" in args.compile.split(","))
    ]
    paths.append(("pipeline epoch", Features(), lambda: pipeline_epoch(workload, spec, data, batch, device), n_epoch, 1, "the shipped epoch function"))
    paths += [
        (
            f"per-sample w{w}",
            Features(),
            lambda w=w: per_sample_step(workload, spec, args.dataset, root, batch, w, device),
            batch,
            args.warmup,
            "medmnist Dataset + torchvision transforms + DataLoader",
        )
        for w in args.workers
    ]
    flops = step_flops(paths[0][2]())
    flops_per_image = flops / batch
    best: dict[str, Row] = {}
    sample_seconds = args.matmul_seconds or (0.2 if device.type == "cuda" else 0.5)  # a GPU's rate is steady; a shared CPU's drifts
    for repeat in range(args.repeats):
        for path, feats, build, per_step, warmup, note in paths if repeat % 2 == 0 else paths[::-1]:
            kind = "fp32" if device.type != "cuda" or not feats.amp else "amp"
            before = roofline.sample(sample_seconds, (kind,))[kind]
            apply_globals(feats, device)
            steps, seconds, mib = measure(build(), device, args.min_time, warmup)
            apply_globals(Features(), device)
            reference = (before + roofline.sample(sample_seconds, (kind,))[kind]) / 2
            rate = per_step * steps / seconds
            row = best.get(path) or Row(
                workload,
                name,
                path,
                str(device),
                0.0,
                0.0,
                0.0,
                batch,
                0,
                unit=unit,
                note=note,
                extra={"rates": [], "references": [], "flops_per_image": flops_per_image},
            )
            row.extra["rates"].append(round(rate, 3))
            row.extra["references"].append(round(reference / 1e12, 6))
            if rate > row.images_per_s:
                row.images_per_s, row.wall_s, row.peak_mem_mib, row.steps = round(rate, 3), round(seconds, 2), mib, steps
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
        rows.append(Row("features", name, path, str(device), round(n * steps / seconds, 1), round(seconds, 2), mib, args.eval_batch, steps, note=note))
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

    for path, step, note in (
        ("ours", ours, f"features once + logistic regression over {len(cs)} C values"),
        ("per-sample w0", classic, f"frozen encoder + linear head, Adam, {args.probe_epochs} epochs of DataLoader"),
    ):
        steps, seconds, mib = measure(step, device, args.min_time, 0)
        rows.append(Row("probe", name, path, str(device), round(n * steps / seconds, 1), round(seconds, 2), mib, n, steps, unit="train images/s", note=note))
        print(f"  {'probe':<10} {name:<9} {path:<16} {rows[-1].images_per_s:>10.1f} labelled images/s", flush=True)
    return rows
