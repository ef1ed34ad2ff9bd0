"""GPU correctness check (not a test): CPU and CUDA in fp32 must agree, step by step and in metrics.

    python bench/gpu_parity.py [--dataset breastmnist] [--epochs 3]

MoCo's shuffling BN (one batch norm per chunk on the CPU, chunks folded into channels on CUDA)
must give the same loss and gradients from the same weights and views. For smallcnn and ResNet-18
(CIFAR stem), from the same weights and batch: logits (eval mode) and the
gradients of one training step must be as close to a float64 reference as the CPU's. Then each model trains for a few epochs from the same
seed on both devices, fp32 (autocast and TF32 off), no augmentation, so every random draw comes
from the CPU generators both devices share. smallcnn's per-epoch losses and AUROCs must match
within tolerance; ResNet-18's are printed for information, because a few epochs of a ResNet-18 on
546 images amplify rounding differences into visibly different trajectories (its step-level checks
are the strict ones). Mixed precision: smallcnn trained under the pipeline's autocast in fp16 with
loss scaling (the path a T4 or V100 takes) and in bf16 must stay finite and follow the fp32
loss trajectory within a looser tolerance; their test AUROC is printed for information (on an
H100, 3 epochs on BreastMNIST: fp16 0.006 and bf16 0.038 from fp32 — 156 test images, and bf16's
8-bit mantissa moves a 3-epoch model's ranking of them). Exits 1 when a tolerance is exceeded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import config, metrics, runtime  # noqa: E402
from pipeline.data import load_splits, to_float  # noqa: E402
from pipeline.errors import DivergenceError  # noqa: E402
from pipeline.models import ModelSpec, build_classifier  # noqa: E402
from pipeline.runtime import prepare_model, seed_everything  # noqa: E402
from pipeline.ssl import build_ssl  # noqa: E402
from pipeline.train import TrainSettings, predict_logits, train_classifier  # noqa: E402

TOLERANCE = {"loss_rel": 0.02, "auroc_abs": 0.01, "logit_abs": 1e-3}
AMP_LOSS_REL = 0.05
GRAD_FACTOR = 10  # fp32 rounding gives 1e-4..1e-3 here (batch-norm cancellation); a wrong kernel gives ~1
TRAJECTORY_CHECKED = {"smallcnn"}


def gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """All parameter gradients of one training-mode BCE step, flattened, float64 on the CPU."""
    model.train()
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
    return torch.cat([p.grad.flatten().cpu().double() for p in model.parameters()])


def step_checks(name: str, spec: ModelSpec, dataset: str) -> list[tuple[str, float, float, bool]]:
    """Same weights, same batch: eval logits of CPU vs CUDA, and one step's gradients of each
    against a float64 CPU reference (CUDA's error: at most GRAD_FACTOR x the CPU's own, or 1e-3)."""
    seed_everything(0)
    cpu_model = build_classifier(spec)
    gpu_model = prepare_model(copy.deepcopy(cpu_model), torch.device("cuda"), {"channels_last": True})
    ref_model = copy.deepcopy(cpu_model).double()
    data = load_splits(dataset, 28, "", torch.device("cpu"))
    x, y = to_float(data.train.images[:128]), data.train.labels[:128].float()
    with torch.inference_mode():
        logit = (cpu_model.eval()(x) - gpu_model.eval()(x.cuda()).cpu()).abs().max().item()
    reference = gradients(ref_model, x.double(), y.double())
    errors = [((gradients(m, a, b) - reference).norm() / reference.norm()).item() for m, a, b in ((cpu_model, x, y), (gpu_model, x.cuda(), y.cuda()))]
    tolerance = max(GRAD_FACTOR * errors[0], 1e-3)
    return [
        (f"{name}: same weights, max abs. logit diff", logit, TOLERANCE["logit_abs"], logit <= TOLERANCE["logit_abs"]),
        (f"{name}: one step's gradients vs float64, rel. L2 error (CPU fp32: {errors[0]:.1e})", errors[1], tolerance, errors[1] <= tolerance),
    ]


def moco_split_bn_checks(dataset: str, device: torch.device) -> list[tuple[str, float, float, bool]]:
    """MoCo with shuffling BN (8 chunks) from the same weights and views: the CPU computes one batch
    norm per chunk, CUDA one over the chunks folded into channels; loss and gradients must agree."""
    seed_everything(0)
    cfg = config.resolve("ssl_pretrain", dataset, {"method": "moco", "queue_size": 512, "bn_splits": 8})
    cpu_module = build_ssl("moco", build_classifier(ModelSpec("smallcnn")), cfg)
    modules = [(torch.device("cpu"), cpu_module), (device, prepare_model(copy.deepcopy(cpu_module), device, {"channels_last": True}))]
    data = load_splits(dataset, 28, "", torch.device("cpu"))
    x = to_float(data.train.images[:256])
    losses, grads = [], []
    for where, module in modules:
        loss = module(x.to(where), x.flip(-1).to(where), torch.arange(256, device=where))
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten().cpu().double() for p in module.backbone.encoder.parameters()]))
    loss_diff = abs(losses[1] - losses[0]) / abs(losses[0])
    grad_diff = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    return [
        ("moco shuffling BN: loss, CPU chunks vs. folded, rel. diff", loss_diff, 1e-4, loss_diff <= 1e-4),
        ("moco shuffling BN: encoder gradients, CPU chunks vs. folded, rel. L2 diff", grad_diff, 1e-2, grad_diff <= 1e-2),
    ]


def train_on(device: torch.device, spec: ModelSpec, dataset: str, epochs: int, amp: bool = False) -> dict:
    """Train with the baseline's config (fp32 unless `amp`) on one device; returns history, test AUROC and the model."""
    cfg = {**config.resolve("baseline", dataset, {}), "epochs": epochs, "amp": amp, "bootstrap": 0}
    data = load_splits(dataset, 28, "", device)
    seed_everything(0)
    model = prepare_model(build_classifier(spec), device, cfg)
    result = train_classifier(model, data.train, data.val, TrainSettings.of(cfg))
    model.load_state_dict(result.best_state)
    logits = predict_logits(model, data.test, 1024)
    return {"history": result.history, "test_auroc": metrics.auroc(logits, data.test.labels.cpu().numpy()), "model": model.cpu(), "best_epoch": result.best_epoch}


def compare(name: str, cpu: dict, gpu: dict) -> list[tuple[str, float, float, bool]]:
    """(check, value, tolerance, passed) rows of two trainings; passed is None where only informative."""
    loss = max(abs(a["train_loss"] - b["train_loss"]) / abs(a["train_loss"]) for a, b in zip(cpu["history"], gpu["history"]))
    val = max(abs(a["val_auroc"] - b["val_auroc"]) for a, b in zip(cpu["history"], gpu["history"]))
    test = abs(cpu["test_auroc"] - gpu["test_auroc"])
    checked = name in TRAJECTORY_CHECKED
    return [
        (f"{name}: max rel. diff of per-epoch train loss", loss, TOLERANCE["loss_rel"], loss <= TOLERANCE["loss_rel"] if checked else None),
        (f"{name}: max abs. diff of per-epoch val AUROC", val, TOLERANCE["auroc_abs"], val <= TOLERANCE["auroc_abs"] if checked else None),
        (
            f"{name}: abs. diff of test AUROC (best epoch {cpu['best_epoch']} vs {gpu['best_epoch']})",
            test,
            TOLERANCE["auroc_abs"],
            test <= TOLERANCE["auroc_abs"] if checked else None,
        ),
    ]


@contextlib.contextmanager
def forced_amp_dtype(dtype: torch.dtype):
    """The pipeline's autocast (and loss scaling) in `dtype`, whatever this GPU's own choice."""
    chosen = runtime.amp_dtype
    runtime.amp_dtype = lambda capability: dtype
    try:
        yield
    finally:
        runtime.amp_dtype = chosen


def amp_checks(dataset: str, epochs: int, fp32: dict) -> list[tuple[str, float, float, bool]]:
    """smallcnn under fp16 autocast + loss scaling and under bf16 autocast vs. the same training in fp32."""
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        name = f"smallcnn {str(dtype).removeprefix('torch.')} autocast" + (" + loss scaling" if dtype == torch.float16 else "")
        try:
            with forced_amp_dtype(dtype):
                run = train_on(torch.device("cuda"), ModelSpec("smallcnn"), dataset, epochs, amp=True)
        except DivergenceError as exc:
            rows.append((f"{name}: training diverged ({exc})", math.inf, AMP_LOSS_REL, False))
            continue
        loss = max(abs(a["train_loss"] - b["train_loss"]) / abs(a["train_loss"]) for a, b in zip(fp32["history"], run["history"]))
        test = abs(fp32["test_auroc"] - run["test_auroc"])
        rows += [
            (f"{name} vs fp32: max rel. diff of per-epoch train loss", loss, AMP_LOSS_REL, loss <= AMP_LOSS_REL),
            (f"{name} vs fp32: abs. diff of test AUROC", test, TOLERANCE["auroc_abs"], None),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", default="smallcnn,resnet18-cifar", help="comma list of smallcnn, resnet18-cifar")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_parity: no CUDA device visible")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    specs = {"smallcnn": ModelSpec("smallcnn"), "resnet18-cifar": ModelSpec("resnet18", stem="cifar")}
    if unknown := set(args.models.split(",")) - set(specs):
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(specs)}")
    for name in args.models.split(","):
        spec = specs[name]
        rows += step_checks(name, spec, args.dataset)
        cpu = train_on(torch.device("cpu"), spec, args.dataset, args.epochs)
        gpu = train_on(torch.device("cuda"), spec, args.dataset, args.epochs)
        print(f"{name}: test AUROC cpu {cpu['test_auroc']:.4f}  cuda {gpu['test_auroc']:.4f}", flush=True)
        rows += compare(name, cpu, gpu)
        if name == "smallcnn":
            rows += amp_checks(args.dataset, args.epochs, gpu)
            rows += moco_split_bn_checks(args.dataset, torch.device("cuda"))
    for check, value, tol, ok in rows:
        verdict = "INFO" if ok is None else "PASS" if ok else "FAIL"
        print(f"{verdict}  {check}: {value:.2e} (tolerance {tol:g}{', not applied' if ok is None else ''})")
    sys.exit(0 if all(ok is not False for *_, ok in rows) else 1)


if __name__ == "__main__":
    main()
