"""Speed settings: thread count, channels_last layout, compile flag, device-resident batch indices."""

import pytest
import torch

from pipeline import runtime
from pipeline.data import batch_indices
from pipeline.models import ModelSpec, build_classifier


@pytest.mark.parametrize(("text", "expected"), [("200000 100000\n", 2), ("150000 100000\n", 1), ("max 100000\n", None)])
def test_cgroup_quota_is_read_in_whole_cores(tmp_path, text, expected):
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert runtime.cgroup_cpu_limit(path) == expected


def test_missing_cgroup_file_means_no_limit(tmp_path):
    assert runtime.cgroup_cpu_limit(tmp_path / "absent") is None


def test_thread_count_follows_omp_num_threads_and_otherwise_the_usable_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.cpu_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= runtime.cpu_threads() <= len(runtime.os.sched_getaffinity(0))


def test_configure_speed_sets_the_cpu_thread_count(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        runtime.configure_speed(torch.device("cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_channels_last_model_computes_the_same_logits():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    for spec in (ModelSpec("smallcnn"), ModelSpec("resnet18", stem="cifar")):
        plain = build_classifier(spec).eval()
        fast = runtime.prepare_model(build_classifier(spec), torch.device("cpu"), {"channels_last": True}).eval()
        fast.load_state_dict(plain.state_dict())
        conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


def test_compile_flag_wraps_the_encoder_and_keeps_checkpoint_keys():
    model = build_classifier(ModelSpec("smallcnn"))
    keys = list(model.state_dict())
    runtime.prepare_model(model, torch.device("cpu"), {"channels_last": False, "compile": True})
    assert model.encoder._compiled_call_impl is not None
    assert list(model.state_dict()) == keys


def test_batch_indices_land_on_the_device_with_the_cpu_permutation():
    batches = list(batch_indices(10, 4, torch.Generator().manual_seed(0), "cpu"))
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), expected)
