"""Malformed or hostile files and numbers: a config, a data file, a checkpoint spec, a predictions
table. Each is refused with one line and exit status 2 before anything is allocated or trained."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from entrypoints import baseline
from entrypoints.common import main
from pipeline.checkpoint import load_classifier, save_checkpoint
from pipeline.errors import UserError
from pipeline.models import ModelSpec, build_classifier
from pipeline.source import read_predictions
from pipeline.synthetic import write_synthetic
from tests.conftest import all_runs
from tests.test_bad_input import assert_one_clear_line

ALIAS_BOMB = "".join(f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcde", "bcdef"))


def config_cases(folder: Path) -> list[tuple[list[str], str]]:
    """(baseline arguments, fragment of the expected line) for config files and numbers."""
    (folder / "not-utf8.yaml").write_bytes(b"\xff\xfe epochs: 1\n")
    (folder / "digits.yaml").write_text("epochs: " + "9" * 400 + "\n")
    (folder / "bomb.yaml").write_text("lr: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + ALIAS_BOMB.replace("b: &b", "weight_decay: &b"))
    (folder / "huge.yaml").write_text("# padding\n" * 200_000)
    return [
        (["--config", str(folder)], "must be a regular file"),
        (["--config", str(folder / "not-utf8.yaml")], "is not UTF-8 text"),
        (["--config", str(folder / "digits.yaml")], "is out of range"),
        (["--config", str(folder / "bomb.yaml")], "aliases (*name) are not allowed"),
        (["--config", str(folder / "huge.yaml")], "under 1024 KiB"),
        (["--batch-size", str(2**70)], "batch_size='1180591620717411303424' is out of range"),
        (["--seed", str(2**64)], "is out of range"),
        (["--batch-size", "1", "--model", "resnet18", "--stem", "imagenet", "--finetune", "all"], "batch_size=1 must be >= 2"),
    ]


def test_bad_config_files_and_numbers(synthetic_root, tracking_uri, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    for args, fragment in config_cases(tmp_path):
        with pytest.raises(SystemExit) as exit_info:
            main(baseline.command, ["--epochs", "1", *args])
        err = capsys.readouterr().err
        assert_one_clear_line(exit_info.value.code, err, fragment)
        assert len(err) < 1000, err  # an error echoes a bounded piece of what it was given
    assert all_runs(tracking_uri) == []


def with_arrays(root: Path, **replaced: np.ndarray) -> Path:
    """A synthetic breastmnist.npz under `root` with some arrays replaced."""
    path = write_synthetic(root)
    arrays = {**dict(np.load(path)), **replaced}
    np.savez(path, **arrays)
    return root


def with_huge_header(root: Path) -> Path:
    """An npz whose train_images header claims 10^13 images over a few bytes of data."""
    path = write_synthetic(root)
    arrays = dict(np.load(path))
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            member = io.BytesIO()
            if key == "train_images":
                np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (10**13, 28, 28)})
                member.write(value.tobytes())
            else:
                np.save(member, value)
            archive.writestr(f"{key}.npy", member.getvalue())
    return root


def data_cases(folder: Path) -> list[tuple[Path, str]]:
    """(data root, fragment of the expected line) for malformed data files and roots."""
    npy = folder / "npy"
    npy.mkdir()
    np.save(npy / "breastmnist.npy", np.zeros(3))
    (npy / "breastmnist.npy").rename(npy / "breastmnist.npz")
    (folder / "a-file").write_text("not a folder")
    empty = {"val_images": np.zeros((0, 28, 28), np.uint8), "val_labels": np.zeros((0, 1), np.uint8)}
    return [
        (with_arrays(folder / "c0", train_images=np.zeros((96, 28, 28, 0), np.uint8)), "breastmnist has 1 channel), got uint8 (96, 28, 28, 0)"),
        (with_arrays(folder / "c5", train_images=np.zeros((96, 28, 28, 5), np.uint8)), "got uint8 (96, 28, 28, 5)"),
        (with_arrays(folder / "labels", train_labels=np.zeros((95, 1), np.uint8)), "one label per image"),
        (with_arrays(folder / "empty", **empty), "the val split holds only class (none: it is empty)"),
        (npy, "not an npz (zip) archive"),
        (with_huge_header(folder / "huge"), "claims shape (10000000000000, 28, 28), more than the file holds"),
        (folder / "a-file", "is a file, not a folder"),
    ]


def test_malformed_data_files(tracking_uri, tmp_path, monkeypatch, capsys):
    for root, fragment in data_cases(tmp_path):
        monkeypatch.setenv("MEDMNIST_ROOT", str(root))
        with pytest.raises(SystemExit) as exit_info:
            main(baseline.command, ["--epochs", "1"])
        assert_one_clear_line(exit_info.value.code, capsys.readouterr().err, fragment)
    assert all_runs(tracking_uri) == []


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({"model": "smallcnn", "in_channels": 10**8}, "in_channels must be one of 1, 3"),
        ({"model": 5}, "model must be one of smallcnn, resnet18"),
        ({"model": "smallcnn", "dropout": "0.5"}, "dropout must be a number"),
        (["smallcnn"], "not a mapping"),
    ],
    ids=["huge-channels", "model-number", "dropout-text", "list"],
)
def test_malformed_checkpoint_spec_is_refused_before_building(spec, fragment, tmp_path):
    path = save_checkpoint(tmp_path / "best.pt", build_classifier(ModelSpec()), ModelSpec(), {})
    data = torch.load(path, weights_only=True)
    torch.save({**data, "spec": spec}, path)
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        load_classifier(path, torch.device("cpu"))


@pytest.mark.parametrize("index", ["0,1,7", "0,0,1", "0,1,-1", "0,1,1.5"])
def test_predictions_must_number_the_split(index, tmp_path):
    path = tmp_path / "test.csv"
    rows = [f"{i},{y},0.5,0.62" for i, y in zip(index.split(","), (0, 1, 1))]
    path.write_text("index,label,logit,prob\n" + "\n".join(rows) + "\n")
    with pytest.raises(UserError, match="must number the split's images 0..2, each once"):
        read_predictions(path, "test predictions")
