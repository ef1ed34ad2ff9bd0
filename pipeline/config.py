"""Resolve a stage's configuration: YAML defaults ← dataset overrides ← profile ← user file ← CLI.

Each stage has `configs/<stage>.yaml`; its keys and the types of their default values are the
schema. `configs/datasets/<dataset>.yaml` and `configs/profiles/<profile>.yaml` hold per-stage
sections that override them (a dataset file also names its `finding_class`, the label of the
clinical finding). Values are coerced to the default's type and checked against RULES,
so every mistake becomes one `UserError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
import reprlib
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from pipeline.augment import preset_names
from pipeline.data import SIZES
from pipeline.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; anything near this is a mistake
MAX_INT = 2**31 - 1  # seeds, sizes and counts: beyond this, torch and numpy overflow or allocate without end
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _short(value: Any) -> str:
    """repr() bounded to a line: a user's value is echoed in errors, and it may be huge."""
    return _REPR.repr(value)


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader without aliases: a config has no use for `*anchor`, and aliases let a few hundred
    bytes expand into gigabytes (a "billion laughs" file)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _one_of(*allowed: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(map(str, allowed))}"

    return check


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda value: None if value >= low else f"must be >= {low}"


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _fraction(value: Any) -> str | None:
    return None if 0 < value <= 1 else "must be in (0, 1]"


def _unit_interval(value: Any) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _fractions(values: Any) -> str | None:
    bad = [v for v in values if not 0 < v <= 1]
    if not values or bad:
        return "must be a non-empty list of fractions in (0, 1]"
    return _distinct(values)


def _distinct(values: Any) -> str | None:
    """A repeated seed or fraction would be counted twice in a mean ± std as if independent."""
    return None if len(set(values)) == len(values) else "must not repeat a value"


def _positives(values: Any) -> str | None:
    return None if values and all(v > 0 for v in values) else "must be a non-empty list of numbers > 0"


def _seeds(values: Any) -> str | None:
    if not values or any(v < 0 for v in values):
        return "must be a non-empty list of seeds >= 0"
    return _distinct(values)


def _subset(*allowed: Any, required: Any = "") -> Callable[[Any], str | None]:
    def check(values: Any) -> str | None:
        bad = [v for v in values if v not in allowed]
        if not values or bad or (required and required not in values):
            need = f", including {required}" if required else ""
            return f"must be a non-empty list of {', '.join(map(str, allowed))}{need}"
        return None

    return check


def _open_fractions(values: Any) -> str | None:
    return None if all(0 < v < 1 for v in values) else "must be a list of rates in (0, 1)"


def _open_unit(value: Any) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


def _confidence(value: Any) -> str | None:
    return None if 0.5 <= value <= 1 else "must be in [0.5, 1] (top-label confidence)"


def _positive_class(value: Any) -> str | None:
    return None if value in ("", "finding", "0", "1") else "must be 0, 1 or finding (the dataset's finding class)"


def _variants(values: Any) -> str | None:
    unknown = [v for v in values if v not in preset_names()]
    if not values or unknown or len(set(values)) != len(values):
        return f"must be a non-empty list of distinct augmentation presets from: {', '.join(preset_names())}"
    return None


RULES: dict[str, Callable[[Any], str | None]] = {
    "size": _one_of(*SIZES),
    "epochs": _at_least(1),
    "eval_every": _at_least(1),
    "batch_size": lambda value: None if value >= 2 else "must be >= 2 (batch norm trains on two images or more)",
    "eval_batch_size": _at_least(1),
    "lr": _positive,
    "weight_decay": _at_least(0),
    "momentum": _unit_interval,
    "seed": _at_least(0),
    "model": _one_of("smallcnn", "resnet18"),
    "stem": _one_of("cifar", "imagenet"),
    "weights": _one_of("auto", "none", "imagenet"),
    "finetune": _one_of("head", "all"),
    "optimizer": _one_of("adam", "adamw", "sgd"),
    "scheduler": _one_of("cosine", "multistep", "none"),
    "device": _one_of("auto", "cpu", "cuda", "mps"),
    "dropout": _unit_interval,
    "label_fraction": _fraction,
    "label_fractions": _fractions,
    "seeds": _seeds,
    "checkpoint_every": _at_least(1),
    "checkpoint_min_seconds": _at_least(0),
    "bootstrap": _at_least(0),
    "ece_bins": _at_least(2),
    "gamma": _positive,
    "warmup_steps": _at_least(0),
    "steps": _at_least(1),
    "ssl_pretrain.epochs": _at_least(0),
    "knn_every": _at_least(1),
    "method": _one_of("simclr", "moco"),
    "temperature": _positive,
    "moco_momentum": _unit_interval,
    "queue_size": _at_least(1),
    "bn_splits": _at_least(1),
    "proj_dim": _at_least(1),
    "proj_hidden_dim": _at_least(1),
    "knn_k": _at_least(1),
    "linear_probe.methods": _subset("ssl_probe", "supervised", "random_probe", "imagenet_probe"),
    "probe_cs": _positives,
    "supervised_epochs": _at_least(0),
    "supervised_steps": _at_least(1),
    "ssl_finetune.epochs": _at_least(0),
    "encoder_lr_scale": _positive,
    "ssl_finetune.encoder_lr_scale": _positives,
    "source_stages": _subset("baseline", "ssl_finetune", "linear_probe", "augment_ablation"),
    "calibrate.methods": _subset("temperature", "platt", "isotonic", required="temperature"),
    "target_tprs": _open_fractions,
    "target_fprs": _open_fractions,
    "confidence": _confidence,
    "positive_class": _positive_class,
    "gallery_max": _at_least(1),
    "corruptions": _subset("gaussian_noise", "gaussian_blur", "contrast", "brightness"),
    "severities": _subset(1, 2, 3, 4, 5),
    "mc_passes": _at_least(2),
    "mc_dropout_p": _open_unit,
    "samples_per_class": _at_least(1),
    "hist_bins": _at_least(2),
    "max_examples": _at_least(0),
    "gallery_n": _at_least(1),
    "variants": _variants,
    "augment": _one_of(*preset_names()),
    "supervised_augment": _one_of(*preset_names()),
}


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable, oversized or non-mapping file is a UserError."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES or not path.is_file():
            raise UserError(f"config file {path} must be a regular file under {MAX_CONFIG_BYTES >> 10} KiB")
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_PlainLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"config file {path} cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return data


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert `value` (often a CLI string) to the type of `default`; YAML booleans are not numbers
    and numbers are not booleans, and a float must be finite."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError
                return lowered in {"true", "1", "yes"}
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(value, bool) and isinstance(default, (int, float)):
            raise ValueError
        if isinstance(default, int):
            number = value if isinstance(value, int) else float(value)
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            if abs(number) > MAX_INT:
                raise UserError(f"{key}={_short(value)} is out of range (at most {MAX_INT} in magnitude)")
            return int(number)
        if isinstance(default, float):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if isinstance(default, list):
            items = [s for s in value.replace(",", " ").split()] if isinstance(value, str) else list(value)
            element = default[0] if default else ""
            return [_coerce(key, item, element) for item in items]
        return "" if value is None else str(value)
    except (TypeError, ValueError, OverflowError):
        kind = {bool: "bool (true/false)", float: "finite float"}.get(type(default), type(default).__name__)
        kind = "list" if isinstance(default, list) else kind
        raise UserError(f"{key}={_short(value)} is not a valid {kind}") from None


def _section(path: Path, stage: str) -> dict[str, Any]:
    return load_yaml(path).get(stage, {}) if path.exists() else {}


def stage_defaults(stage: str) -> dict[str, Any]:
    """The defaults (and so the schema) of a stage."""
    return load_yaml(CONFIG_DIR / f"{stage}.yaml")


def load_profile(profile: str) -> dict[str, Any]:
    """A study profile (`configs/profiles/<name>.yaml`): per-stage overrides plus a `study` plan."""
    path = CONFIG_DIR / "profiles" / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / "profiles").glob("*.yaml"))
        raise UserError(f"unknown profile {profile!r}; known profiles: {', '.join(known)}")
    return load_yaml(path)


def resolve(
    stage: str,
    dataset: str,
    overrides: Mapping[str, Any],
    config_file: str = "",
    profile: str = "",
) -> dict[str, Any]:
    """Return the validated configuration of `stage` for `dataset`.

    `overrides` are CLI values; None or "" means "not given" (MLproject passes "" for unset).
    """
    defaults = stage_defaults(stage)
    layers: list[tuple[str, dict[str, Any]]] = [
        (f"configs/datasets/{dataset}.yaml", _section(CONFIG_DIR / "datasets" / f"{dataset}.yaml", stage)),
    ]
    if profile:
        profile_data = load_profile(profile)
        layers.append((f"configs/profiles/{profile}.yaml", profile_data.get(stage, {})))
        layers.append((f"configs/profiles/{profile}.yaml ({dataset})", profile_data.get(dataset, {}).get(stage, {})))
    if config_file:
        layers.append((config_file, load_yaml(Path(config_file))))
    layers.append(("command line", {k: v for k, v in overrides.items() if v is not None and v != ""}))

    config = dict(defaults)
    for source, layer in layers:
        for key, value in layer.items():
            if key not in defaults:
                raise UserError(f"unknown {stage} setting {_short(key)} (from {source}); known: {', '.join(sorted(defaults))}")
            config[key] = _coerce(key, value, defaults[key])
    for key, value in config.items():
        check = RULES.get(f"{stage}.{key}") or RULES.get(key)
        problem = check(value) if check else None
        if problem:
            raise UserError(f"{key}={_short(value)} {problem}")
    config["dataset"] = dataset
    return pretrained_head(positive_class(config))


def derive(parent: Mapping[str, Any], overrides: Mapping[str, Any], stage: str = "") -> dict[str, Any]:
    """The config of a child run that a grid makes: the parent's settings, then the child's own
    values (`overrides`: its seed, label fraction, ...). Every grid builds its children here.
    A child trained as another `stage` (a baseline classifier) takes every setting the parent
    shares with that stage, so a new shared key follows the parent and never the stage's default,
    and is validated as the stage's own; without `stage`, the child keeps its parent's validated
    settings (and so its grid lists) and adds what the grid chose for it."""
    if not stage:
        return {**parent, **overrides}
    shared = {k: v for k, v in parent.items() if k in stage_defaults(stage)}
    return resolve(stage, parent["dataset"], {**shared, **overrides})


def finding_class(dataset: str) -> int:
    """The label of the dataset's clinical finding (`finding_class` in configs/datasets/<dataset>.yaml)."""
    path = CONFIG_DIR / "datasets" / f"{dataset}.yaml"
    value = load_yaml(path).get("finding_class") if path.exists() else None
    if type(value) is not int or value not in (0, 1):
        raise UserError(f"configs/datasets/{dataset}.yaml names no finding_class (0 or 1): set positive_class=0 or 1")
    return value


def positive_class(config: dict[str, Any]) -> dict[str, Any]:
    """Resolve `positive_class` to the label 0 or 1; `finding` (or empty) is the dataset's finding class."""
    if "positive_class" in config:
        value = config["positive_class"]
        config["positive_class"] = finding_class(config["dataset"]) if value in ("", "finding") else int(value)
    return config


def pretrained_head(config: dict[str, Any]) -> dict[str, Any]:
    """Resolve `weights: auto` (ImageNet weights for head-only training, none otherwise) and refuse
    head-only training without pretrained weights: a linear head on a frozen random network is not
    a baseline."""
    if "weights" not in config or "finetune" not in config:
        return config
    if config["weights"] == "auto":
        config["weights"] = "imagenet" if config["finetune"] == "head" else "none"
    if config["finetune"] == "head" and (config["weights"] != "imagenet" or config.get("model") != "resnet18"):
        raise UserError(
            "finetune=head trains only a linear head on a frozen encoder, so it needs pretrained weights: "
            "use model=resnet18 with weights=imagenet (or auto), or finetune=all to train from scratch"
        )
    return config


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a resolved configuration, used to find reusable runs."""
    canonical = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
