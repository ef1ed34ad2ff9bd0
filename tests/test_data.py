"""Data loading through medmnist: synthetic files, real files, refusals, subsets, batching."""

import numpy as np
import pytest
import torch
from medmnist.info import INFO

from pipeline import data
from pipeline.errors import UserError
from pipeline.synthetic import write_synthetic
from tests.conftest import REAL_DATA


def test_synthetic_files_have_medmnist_format(synthetic_root):
    arrays = np.load(synthetic_root / "breastmnist.npz")
    assert set(arrays.files) == {f"{s}_{k}" for s in data.SPLITS for k in ("images", "labels")}
    assert arrays["train_images"].dtype == np.uint8 and arrays["train_images"].shape[1:] == (28, 28)
    assert arrays["train_labels"].dtype == np.uint8 and arrays["train_labels"].shape[1] == 1


def test_load_splits_puts_uint8_tensors_on_device(synthetic_root):
    splits = data.load_splits("breastmnist", 28, str(synthetic_root), torch.device("cpu"))
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (1, 28, 28)
    assert splits.val.labels.dtype == torch.int64 and set(splits.test.labels.tolist()) == {0, 1}
    assert splits.label_names == INFO["breastmnist"]["label"]


def test_larger_sizes_use_medmnist_file_names(tmp_path):
    write_synthetic(tmp_path, "pneumoniamnist", size=64)
    assert (tmp_path / "pneumoniamnist_64.npz").exists()
    splits = data.load_splits("pneumoniamnist", 64, str(tmp_path), torch.device("cpu"))
    assert splits.train.images.shape[-2:] == (64, 64)


def test_data_root_falls_back_to_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDMNIST_ROOT", str(tmp_path / "env-root"))
    assert data.resolve_root("") == tmp_path / "env-root"
    assert data.resolve_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


@pytest.mark.parametrize("name", ["pathmnist", "chestmnist", "nodulemnist3d", "octmnist"])
def test_non_binary_or_3d_datasets_are_refused_with_reason(name):
    with pytest.raises(UserError) as info:
        data.check_dataset(name)
    message = str(info.value)
    assert name in message and "breastmnist, pneumoniamnist" in message
    assert ("3D" in message) == name.endswith("3d")


def test_unknown_dataset_lists_allowed_keys():
    with pytest.raises(UserError, match="unknown dataset 'cifar10'; choose one of: breastmnist, pneumoniamnist"):
        data.check_dataset("cifar10")


def test_missing_file_offline_names_file_url_md5_and_place(tmp_path, monkeypatch):
    # Point medmnist's URL at a closed local port: an offline machine, deterministically.
    monkeypatch.setitem(INFO["breastmnist"], "url", "http://127.0.0.1:9/breastmnist.npz")
    with pytest.raises(UserError) as info:
        data.load_arrays("breastmnist", 28, tmp_path)
    message = str(info.value)
    assert "breastmnist.npz" in message and INFO["breastmnist"]["MD5"] in message
    assert str(tmp_path / "breastmnist.npz") in message and "127.0.0.1:9" in message


def test_corrupted_and_truncated_files_give_clear_errors(tmp_path):
    good = write_synthetic(tmp_path / "good", "breastmnist").read_bytes()
    for name, content in {"garbage": b"not a zip file at all", "truncated": good[: len(good) // 2]}.items():
        root = tmp_path / name
        root.mkdir()
        (root / "breastmnist.npz").write_bytes(content)
        with pytest.raises(UserError, match="corrupted or truncated"):
            data.load_arrays("breastmnist", 28, root)


def test_wrong_labels_are_refused(tmp_path):
    path = write_synthetic(tmp_path, "breastmnist")
    arrays = dict(np.load(path))
    arrays["val_labels"] = arrays["val_labels"] + 2
    np.savez(path, **arrays)
    with pytest.raises(UserError, match="val_labels must hold one 0/1 label"):
        data.load_arrays("breastmnist", 28, tmp_path)


def test_stratified_subset_one_percent_of_breastmnist_is_five_images():
    labels = np.array([0] * 147 + [1] * 399)  # BreastMNIST's train split
    subset = data.stratified_subset(labels, 0.01, seed=0)
    assert len(subset) == 5 and set(labels[subset]) == {0, 1}
    assert np.array_equal(subset, data.stratified_subset(labels, 0.01, seed=0))
    assert not np.array_equal(subset, data.stratified_subset(labels, 0.01, seed=1))
    tenth = data.stratified_subset(labels, 0.10, seed=0)
    assert (labels[tenth] == 0).sum() == 15 and (labels[tenth] == 1).sum() == 40
    assert np.all(np.diff(tenth) > 0)  # sorted indices, each image at most once
    assert np.array_equal(data.stratified_subset(labels, 1.0, seed=3), np.arange(len(labels)))


def test_tiny_fraction_keeps_one_image_per_class():
    labels = np.array([0] * 10 + [1] * 90)
    subset = data.stratified_subset(labels, 0.001, seed=0)
    assert sorted(labels[subset].tolist()) == [0, 1]


def test_batches_cover_every_index_once_and_follow_the_seed():
    first = list(data.batch_indices(10, 4, torch.Generator().manual_seed(0)))
    again = list(data.batch_indices(10, 4, torch.Generator().manual_seed(0)))
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_DATA / "breastmnist.npz").exists(), reason="real MedMNIST files not present")
@pytest.mark.parametrize("name", ["breastmnist", "pneumoniamnist"])
def test_real_files_match_medmnist_split_sizes(name):
    arrays = data.load_arrays(name, 28, REAL_DATA)
    assert {s: len(a.labels) for s, a in arrays.items()} == INFO[name]["n_samples"]


@pytest.mark.parametrize(
    "labels, message",
    [
        (lambda y: y.astype(np.float32) * 0.9 + 0.05, "train_labels must hold one 0/1 label per image"),  # 0.05 / 0.95: cast would make all 0
        (lambda y: np.zeros_like(y), "the train split holds only class 0; a binary classifier needs both classes"),
    ],
)
def test_float_or_one_class_training_labels_are_refused(tmp_path, labels, message):
    path = write_synthetic(tmp_path, "breastmnist")
    arrays = dict(np.load(path))
    arrays["train_labels"] = labels(arrays["train_labels"])
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=message):
        data.load_arrays("breastmnist", 28, tmp_path)


def test_a_data_file_that_is_not_a_regular_file_is_refused_before_hashing(tmp_path):
    (tmp_path / "breastmnist.npz").symlink_to("/dev/zero")  # hashing it would never end
    with pytest.raises(UserError, match="is not a regular file"):
        data.fingerprint("breastmnist", 28, str(tmp_path))
