"""Speed settings: thread count, channels_last layout, compile flag, device-resident batch indices."""

import pytest
import torch

from pipeline import config, runtime
from pipeline.data import batch_indices
from pipeline.errors import UserError
from pipeline.models import ModelSpec, build_classifier
from pipeline.ssl import build_ssl


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
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(runtime.psutil, "cpu_count", lambda logical=True: 16 if logical else 8)
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: None)
    assert runtime.cpu_threads() == 8  # physical cores, not hyper-threads
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: 2)
    assert runtime.cpu_threads() == 2  # the container's quota
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0})
    assert runtime.cpu_threads() == 1  # pinned to one CPU


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
        conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


def test_config_without_the_layout_key_keeps_the_contiguous_layout():
    model = runtime.prepare_model(build_classifier(ModelSpec("smallcnn")), torch.device("cpu"), {})
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert not conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_flag_wraps_the_encoder_and_keeps_checkpoint_keys():
    model = build_classifier(ModelSpec("smallcnn"))
    keys = list(model.state_dict())
    runtime.prepare_model(model, torch.device("cpu"), {"channels_last": False, "compile": True})
    assert model.encoder._compiled_call_impl is not None
    assert list(model.state_dict()) == keys
    moco = build_ssl("moco", build_classifier(ModelSpec("smallcnn")), config.resolve("ssl_pretrain", "breastmnist", {}))
    runtime.prepare_model(moco, torch.device("cpu"), {"compile": True})
    assert moco.backbone.encoder._compiled_call_impl is not None
    with pytest.raises(UserError, match="needs a model with an encoder"):
        runtime.prepare_model(torch.nn.Linear(2, 1), torch.device("cpu"), {"compile": True})


def test_batch_indices_land_on_the_device_with_the_cpu_permutation():
    batches = list(batch_indices(10, 4, torch.Generator().manual_seed(0)))
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), expected)
    on_device = list(batch_indices(10, 4, torch.Generator().manual_seed(0), "meta"))
    assert [b.device.type for b in on_device] == ["meta"] * 3 and [len(b) for b in on_device] == [4, 4, 2]


@pytest.mark.parametrize(("capability", "dtype"), [((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_autocast_dtype_is_fp16_before_ampere_and_bf16_from_it(capability, dtype):
    assert runtime.amp_dtype(capability) == dtype


def test_grad_scaler_is_a_pass_through_off_cuda():
    assert not runtime.grad_scaler(torch.device("cpu"), True).is_enabled()


def _scaled_and_plain(step) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights after one epoch with an active loss scaler (init scale 2^12) and with none."""
    out = []
    for scaler in (torch.amp.GradScaler("cpu", init_scale=2.0**12), None):
        out.append([p.detach().clone() for p in step(scaler).parameters()])
    return out[0], out[1]


def test_loss_scaling_in_the_supervised_epoch_leaves_the_update_unchanged(synthetic_root):
    from pipeline.augment import identity
    from pipeline.data import load_splits
    from pipeline.train import train_epoch

    data = load_splits("breastmnist", 28, str(synthetic_root), torch.device("cpu"))

    def step(scaler):
        torch.manual_seed(0)
        model = build_classifier(ModelSpec("smallcnn"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_epoch(model, data.train, optimizer, identity, 32, 0, False, "test", scaler)
        return model

    scaled, plain = _scaled_and_plain(step)
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loss_scaling_in_the_ssl_epoch_leaves_the_update_unchanged(synthetic_root):
    from pipeline.data import load_splits
    from pipeline.pretrain import PretrainSettings, StepTrainer, epoch_views

    data = load_splits("breastmnist", 28, str(synthetic_root), torch.device("cpu"))
    cfg = {**config.resolve("ssl_pretrain", "breastmnist", {"model": "smallcnn", "batch_size": 32}), "amp": False}

    def step(scaler):
        torch.manual_seed(0)
        module = build_ssl("simclr", build_classifier(ModelSpec("smallcnn")), cfg)
        trainer = StepTrainer(module, PretrainSettings.of({**cfg, "warmup_steps": 0}), 10, torch.device("cpu"))
        trainer.optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        trainer.scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        for index, view1, view2 in epoch_views(data.train.images, PretrainSettings.of(cfg), 1):
            trainer.step(view1, view2, index)
        return module

    scaled, plain = _scaled_and_plain(step)
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
