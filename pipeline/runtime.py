"""Device choice, seeding and per-device speed settings."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import psutil
import torch
from torch import nn

from pipeline.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; an explicit device must be present."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but Apple MPS is not available; use device=auto or device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: shuffling, augmentation and dropout depend on (seed, epoch) only,
    so a run resumed at an epoch boundary continues exactly as an uninterrupted one."""
    return seed * 100_003 + epoch


def cgroup_cpu_limit(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The container's CPU quota in whole cores (cgroup v2 `cpu.max`), or None when unlimited."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, int(int(quota) / int(period)))


def cpu_threads() -> int:
    """Intra-op threads for the CPU: the smallest of the CPUs in our affinity mask, the machine's
    physical cores and the container's quota.

    Hyper-threads and cores hidden by a quota only add contention to the convolution kernels.
    `OMP_NUM_THREADS`, when set, wins.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or usable
    return max(1, min(usable, physical, cgroup_cpu_limit() or usable))


def configure_speed(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning and TF32 matmuls on CUDA; the right intra-op thread count on the CPU.

    `deterministic`: the same seed gives the same numbers on the same machine whatever its core
    count: one CPU thread (a reduction split over more threads adds in another order),
    deterministic algorithms, and on CUDA no autotuning, no TF32 and cuBLAS's fixed workspace.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return
    torch.use_deterministic_algorithms(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(cpu_threads())


def reproducibility_tags() -> dict[str, str]:
    """How this process computes: its torch thread count and whether deterministic algorithms are on."""
    return {"torch_threads": str(torch.get_num_threads()), "deterministic": str(torch.are_deterministic_algorithms_enabled()).lower()}


def prepare_model(model: nn.Module, device: torch.device, cfg: Mapping[str, Any]) -> nn.Module:
    """Move a model to the device in the layout its kernels run fastest in.

    `channels_last` (NHWC) lets cuDNN and oneDNN pick their fastest convolutions on both GPU and
    CPU; `compile` wraps the encoder's forward in `torch.compile` (state_dict keys unchanged; for
    MoCo only the query encoder, the one trained by gradient). A config without `channels_last`
    predates the switch (a checkpoint being resumed) and keeps the contiguous layout it ran with.
    """
    model = model.to(device)
    if cfg.get("channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    if cfg.get("compile", False):
        owner = model.backbone if hasattr(model, "backbone") else model
        if not hasattr(owner, "encoder"):
            raise UserError(f"compile=true needs a model with an encoder; {type(model).__name__} has none")
        owner.encoder.compile()
    return model


def amp_dtype(capability: tuple[int, int]) -> torch.dtype:
    """The autocast dtype for a CUDA GPU of this compute capability: bf16 from Ampere (8.0) on,
    fp16 before (T4, V100), where bf16 has no tensor cores and runs emulated, slower than fp32."""
    return torch.bfloat16 if capability >= (8, 0) else torch.float16


def _uses_amp(device: torch.device, enabled: bool) -> bool:
    return enabled and device.type == "cuda"


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed-precision autocast on CUDA when enabled (dtype from `amp_dtype`); a no-op elsewhere."""
    dtype = amp_dtype(torch.cuda.get_device_capability(device)) if _uses_amp(device, enabled) else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=_uses_amp(device, enabled))


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast, whose small gradients would underflow; a pass-through
    (disabled scaler) for bf16 and fp32, which share fp32's exponent range."""
    fp16 = _uses_amp(device, enabled) and amp_dtype(torch.cuda.get_device_capability(device)) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=fp16)
