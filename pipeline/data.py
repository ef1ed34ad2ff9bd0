"""MedMNIST2D binary datasets as uint8 tensors held on the device, batched by index permutation.

Loading goes through the `medmnist` package (its dataset classes, INFO table and download code), so
the files are exactly those medmnist uses. Images stay uint8 until a batch is drawn: a whole
PneumoniaMNIST split at 28×28 is under 4 MB, so it lives on the GPU next to the model.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import medmnist
import numpy as np
import torch
from medmnist.info import DEFAULT_ROOT, INFO

from pipeline.errors import UserError

SIZES = (28, 64, 128, 224)  # the image sizes MedMNIST publishes

SPLITS = ("train", "val", "test")


def binary_2d_datasets() -> list[str]:
    """The medmnist keys this project accepts: binary-class tasks on 2D images."""
    return sorted(k for k, v in INFO.items() if v["task"] == "binary-class" and not k.endswith("3d"))


def check_dataset(name: str) -> None:
    """Refuse names medmnist does not know, and medmnist datasets that are not binary 2D."""
    allowed = ", ".join(binary_2d_datasets())
    if name not in INFO:
        raise UserError(f"unknown dataset {name!r}; choose one of: {allowed}")
    info = INFO[name]
    if name not in binary_2d_datasets():
        kind = "3D" if name.endswith("3d") else "2D"
        raise UserError(f"dataset {name!r} is a {kind} {info['task']} task; medmnist-ssl studies binary 2D classification only: choose one of: {allowed}")


def resolve_root(data_root: str = "") -> Path:
    """The data folder: `data_root`, else $MEDMNIST_ROOT, else medmnist's default (~/.medmnist)."""
    root = Path(data_root or os.environ.get("MEDMNIST_ROOT") or DEFAULT_ROOT).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"the data root {root} is a file, not a folder; point data_root/MEDMNIST_ROOT at the folder of the npz files")
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_name(name: str, size: int) -> str:
    """medmnist's file naming: `breastmnist.npz` at 28 px, `breastmnist_64.npz` above."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _size_flag(size: int) -> str:
    return "" if size == 28 else f"_{size}"


def ensure_file(name: str, size: int, root: Path) -> Path:
    """Return the npz path, downloading it with medmnist when missing; offline, say what to do."""
    check_dataset(name)
    if size not in SIZES:
        raise UserError(f"size={size} must be one of {', '.join(map(str, SIZES))}")
    path = root / file_name(name, size)
    if path.exists():
        return path
    data_class = getattr(medmnist, INFO[name]["python_class"])
    try:
        data_class(split="train", root=str(root), download=True, size=size)
    except Exception:  # medmnist wraps every download failure in a bare RuntimeError
        info, flag = INFO[name], _size_flag(size)
        raise UserError(
            f"{path.name} is not in {root} and could not be downloaded: fetch {info['url' + flag]} "
            f"(MD5 {info['MD5' + flag]}) and put it at {path}, or point data_root/MEDMNIST_ROOT at "
            f"the folder that holds it"
        ) from None
    return path


MAX_DATA_BYTES = 4 * 2**30  # the largest MedMNIST2D file (224 px) is well under this


def fingerprint(name: str, size: int, data_root: str = "") -> str:
    """The MD5 of the npz file a step reads at `size` (what the study's reuse key and tags record,
    so a run on other data is never taken for this one)."""
    path = ensure_file(name, size, resolve_root(data_root)).resolve()
    if not path.is_file():  # a device such as /dev/zero would be read forever
        raise UserError(f"{path} is not a regular file; point data_root/MEDMNIST_ROOT at the folder of the official npz files")
    stat = path.stat()
    if stat.st_size > MAX_DATA_BYTES:
        raise UserError(
            f"{path} holds {stat.st_size / 2**30:.1f} GiB, more than any MedMNIST2D file ({MAX_DATA_BYTES / 2**30:.0f} GiB at most); it is not the official file"
        )
    return _file_md5(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=None)
def _file_md5(path: str, size: int, mtime_ns: int) -> str:
    """MD5 of a file, computed once per (path, size, modification time)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ArraySplit:
    """One split as numpy arrays: images uint8 N×H×W (or N×H×W×C), labels int64 N."""

    images: np.ndarray
    labels: np.ndarray


def _array_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an npz file, read from the headers alone (nothing is
    allocated, so a header claiming 10^13 images costs nothing); a header claiming more data than
    its member holds is refused."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not an npz (zip) archive")
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(member)
            if int(np.prod(shape, dtype=object)) * dtype.itemsize > info.file_size:
                raise ValueError(f"{info.filename} claims shape {shape}, more than the file holds")
            shapes[info.filename.removesuffix(".npy")] = (tuple(shape), dtype)
    return shapes


def corrupted(path: Path, name: str, size: int, reason: str) -> UserError:
    """The one line for a data file that cannot be read as MedMNIST's: what failed and the MD5 to fetch."""
    return UserError(f"{path} is corrupted or truncated ({reason}): delete it and download it again (expected MD5 {INFO[name]['MD5' + _size_flag(size)]})")


def check_layout(path: Path, name: str, size: int) -> None:
    """Refuse a file whose arrays are not the dataset's declared layout (uint8 N×size×size for one
    channel, N×size×size×C otherwise; N labels), before anything is loaded."""
    channels = INFO[name]["n_channels"]
    image_shape = (size, size) if channels == 1 else (size, size, channels)
    try:
        shapes = _array_shapes(path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise corrupted(path, name, size, str(exc)) from None
    for split in SPLITS:
        images, labels = shapes.get(f"{split}_images"), shapes.get(f"{split}_labels")
        if images is None or labels is None:
            raise UserError(f"{path} has no {split}_images/{split}_labels arrays; it is not MedMNIST's npz file")
        if images[1] != np.uint8 or images[0][1:] != image_shape:
            raise UserError(
                f"{path}: {split}_images must be uint8 N×{'×'.join(map(str, image_shape))} "
                f"({name} has {channels} channel{'s' * (channels > 1)}), got {images[1]} {images[0]}"
            )
        if labels[0][:1] != images[0][:1] or int(np.prod(labels[0][1:], dtype=object)) != 1:
            raise UserError(f"{path}: {split}_labels must hold one label per image, got shape {labels[0]} for {images[0][0]} images")


def load_arrays(name: str, size: int, root: Path) -> dict[str, ArraySplit]:
    """Read the three splits through medmnist's dataset class, validating shapes and labels."""
    path = ensure_file(name, size, root)
    check_layout(path, name, size)
    data_class = getattr(medmnist, INFO[name]["python_class"])
    splits: dict[str, ArraySplit] = {}
    try:
        for split in SPLITS:
            dataset = data_class(split=split, root=str(root), download=False, size=size)
            images = np.asarray(dataset.imgs)
            raw = np.asarray(dataset.labels).reshape(-1)
            if not np.isin(raw, (0, 1)).all():  # before the cast: 0.95 would silently become 0
                raise UserError(f"{path}: {split}_labels must hold one 0/1 label per image (found {raw.dtype} values {', '.join(map(str, np.unique(raw)[:4]))})")
            splits[split] = ArraySplit(images, raw.astype(np.int64))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, RuntimeError) as exc:
        raise corrupted(path, name, size, type(exc).__name__) from None
    for split, arrays in splits.items():
        labels = arrays.labels
        if len(np.unique(labels)) < 2:  # training, model selection (AUROC) and testing all need both classes
            raise UserError(
                f"{path}: the {split} split holds only class {labels[0] if len(labels) else '(none: it is empty)'}; a binary classifier needs both classes in every split"
            )
    return splits


@dataclass
class Split:
    """A split on the device: uint8 images N×C×H×W and int64 labels N."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | torch.Tensor) -> "Split":
        index = torch.as_tensor(indices, dtype=torch.long, device=self.labels.device)
        return Split(self.images[index], self.labels[index])


@dataclass
class DatasetSplits:
    """The three splits of one dataset at one size, plus medmnist's label names."""

    name: str
    size: int
    train: Split
    val: Split
    test: Split
    label_names: dict[str, str]
    source: str = ""  # the .npz file the splits were read from

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    def split(self, name: str) -> Split:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def to_split(arrays: ArraySplit, device: torch.device) -> Split:
    """Move one split to the device once, channels first."""
    images = torch.from_numpy(arrays.images)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return Split(images.contiguous().to(device), torch.from_numpy(arrays.labels).to(device))


def load_splits(name: str, size: int, data_root: str, device: torch.device) -> DatasetSplits:
    """Load a dataset's three splits onto `device`."""
    root = resolve_root(data_root)
    arrays = load_arrays(name, size, root)
    return DatasetSplits(
        name=name,
        size=size,
        train=to_split(arrays["train"], device),
        val=to_split(arrays["val"], device),
        test=to_split(arrays["test"], device),
        label_names=dict(INFO[name]["label"]),
        source=str(root / file_name(name, size)),
    )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 batch → float in [0, 1] (normalisation lives in the model)."""
    return images.float().div_(255.0)


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Iterator[torch.Tensor]:
    """Index batches of a seeded permutation of n samples; the last batch may be short.

    The permutation is drawn on the CPU (the same order on every device) and copied to `device`
    once per epoch, so a step never waits on a host-to-device copy.
    """
    yield from torch.randperm(n, generator=generator).to(device).split(batch_size)


def fold_single(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fold a one-sample last batch into the one before: batch norm in training mode cannot
    normalise a single sample once the feature maps are 1×1 (ResNet-18's torchvision stem at 28 px)."""
    if len(batches) > 1 and len(batches[-1]) == 1:
        return [*batches[:-2], torch.cat(batches[-2:])]
    return batches


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a seeded, class-stratified `fraction` of the samples, at least one per class.

    Each class keeps round(fraction × its count) samples (minimum 1), so 1% of BreastMNIST's 546
    training images is 1 malignant + 4 benign/normal = 5 images. Indices come back sorted.
    """
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        keep = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=keep, replace=False))
    return np.sort(np.concatenate(chosen))
