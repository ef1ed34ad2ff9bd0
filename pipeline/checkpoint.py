"""Checkpoints as data: tensors and plain containers only, always loaded with weights_only=True."""

from __future__ import annotations

import dataclasses
import pickle
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pipeline.errors import UserError
from pipeline.models import Classifier, ModelSpec, build_classifier


class CheckpointSchedule:
    """When a training writes its resumable `last.pt`: every `every` epochs or steps (the config's
    `checkpoint_every`; never after the `last` one), but no sooner than `min_seconds`
    (`checkpoint_min_seconds`) after the previous one or the start.

    On a GPU an epoch at 28 px takes less time than writing a ResNet-18's training state, so a
    short run is cheaper to rerun than to checkpoint; a long run still loses at most a few epochs.
    """

    def __init__(self, every: int, last: int, min_seconds: float = 0, clock: Callable[[], float] = time.monotonic):
        """`last`: the final epoch (or step, for a step-budgeted run), after which no last.pt is written."""
        self.every, self.epochs, self.min_seconds = every, last, min_seconds
        self.clock = clock
        self.last = clock()
        self.previous = 0

    def due(self, epoch: int) -> bool:
        """Whether to checkpoint after `epoch` (or step): a multiple of `every` was reached
        since the previous call; a True answer restarts the interval."""
        crossed = epoch // self.every > self.previous // self.every
        self.previous = epoch
        if not crossed or epoch >= self.epochs or self.clock() - self.last < self.min_seconds:
            return False
        self.last = self.clock()
        return True


def save_checkpoint(path: Path, model: torch.nn.Module, spec: ModelSpec, config: Mapping[str, Any], **extra: Any) -> Path:
    """Write {state_dict, spec, config, **extra} so that `torch.load(weights_only=True)` reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "spec": spec.to_dict(), "config": dict(config), **extra}, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint as data; anything unreadable or not ours is a UserError."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"checkpoint {path} cannot be read as data ({type(exc).__name__}); it is corrupted or not a medmnist-ssl checkpoint") from None
    if not isinstance(data, dict) or "state_dict" not in data or "spec" not in data:
        raise UserError(f"checkpoint {path} is not a medmnist-ssl checkpoint (no state_dict/spec)")
    return data


SPEC_VALUES: dict[str, tuple[Any, ...]] = {
    "model": ("smallcnn", "resnet18"),
    "in_channels": (1, 3),
    "stem": ("cifar", "imagenet"),
    "weights": ("none", "imagenet", "auto"),
}


def spec_from_checkpoint(raw: Any, path: Path) -> ModelSpec:
    """The ModelSpec a checkpoint stores, checked before anything is built: a malformed or hostile
    spec (a string for a number, `in_channels: 10**8`) is one UserError, not an allocation."""
    if not isinstance(raw, dict):
        raise UserError(f"checkpoint {path} has a malformed model spec (not a mapping)")
    fields = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
    spec = {k: v for k, v in raw.items() if k in fields}
    for key, allowed in SPEC_VALUES.items():
        if key in spec and (type(spec[key]) is not type(fields[key]) or spec[key] not in allowed):
            raise UserError(f"checkpoint {path} has a malformed model spec: {key} must be one of {', '.join(map(str, allowed))}")
    dropout = spec.get("dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise UserError(f"checkpoint {path} has a malformed model spec: dropout must be a number in [0, 1)")
    return ModelSpec(**spec)


def load_classifier(path: Path, device: torch.device) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier a checkpoint describes and load its weights (no weight download)."""
    data = load_checkpoint(path)
    spec = spec_from_checkpoint(data["spec"], path)
    model = build_classifier(dataclasses.replace(spec, weights="none"))
    load_weights(model, data["state_dict"], f"checkpoint {path}", spec.model)
    return model.to(device).eval(), data


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, architecture: str) -> None:
    """Load a state dict into `model`; a mismatch (another architecture) is a UserError."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(f"{source} does not match the architecture {architecture}: {str(exc).splitlines()[0]}") from None


def load_train_state(path: Path) -> dict[str, Any]:
    """Read a `last.pt` checkpoint and check it holds a resumable training state."""
    data = load_checkpoint(path)
    state = data.get("train_state")
    keys = {"epoch", "model", "optimizer", "scheduler", "best_state", "best_epoch", "best_auroc", "history"}
    if not isinstance(state, dict) or not keys <= set(state) or not isinstance(data.get("config"), dict):
        raise UserError(f"checkpoint {path} holds no resumable training state (train_state and config)")
    return data
