"""Model shapes, stems, head-only freezing, and ImageNet weights through torchvision's API."""

import pytest
import torch

from pipeline.checkpoint import load_classifier, save_checkpoint
from pipeline.errors import UserError
from pipeline.models import ModelSpec, build_classifier


@pytest.mark.parametrize(
    "spec",
    [ModelSpec("smallcnn"), ModelSpec("resnet18", stem="cifar"), ModelSpec("resnet18", stem="imagenet")],
)
def test_one_logit_per_image_and_encoder_features(spec):
    model = build_classifier(spec).eval()
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3,)
    assert model.features(x).shape == (3, model.feat_dim)


def test_stems_differ_as_specified():
    cifar = build_classifier(ModelSpec("resnet18", stem="cifar")).encoder
    imagenet = build_classifier(ModelSpec("resnet18", stem="imagenet")).encoder
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, torch.nn.MaxPool2d)


def test_head_only_freezes_weights_and_batchnorm_statistics():
    model = build_classifier(ModelSpec("resnet18", stem="imagenet"), finetune="head")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.rand(8, 1, 28, 28)).sum()
    loss.backward()
    optimizer.step()
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running means/vars untouched too


def test_imagenet_weights_load_through_weights_api(local_imagenet_weights):
    model = build_classifier(ModelSpec("resnet18", stem="imagenet", weights="imagenet"))
    expected = local_imagenet_weights["conv1.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(model.encoder.conv1.weight, expected)
    assert torch.equal(model.encoder.layer4[1].conv2.weight, local_imagenet_weights["layer4.1.conv2.weight"])
    assert model.mean.item() == pytest.approx(0.449)


def test_imagenet_weights_with_cifar_stem_keep_the_pretrained_first_convolution(local_imagenet_weights):
    model = build_classifier(ModelSpec("resnet18", stem="cifar", weights="imagenet"))
    conv1 = model.encoder.conv1
    assert conv1.kernel_size == (7, 7) and conv1.stride == (1, 1) and isinstance(model.encoder.maxpool, torch.nn.Identity)
    assert torch.equal(conv1.weight, local_imagenet_weights["conv1.weight"].sum(dim=1, keepdim=True))
    assert model(torch.rand(2, 1, 28, 28)).shape == (2,)


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_every_frozen_parameter_of_a_head_only_model_is_pretrained(local_imagenet_weights, stem):
    model = build_classifier(ModelSpec("resnet18", stem=stem, weights="imagenet"), finetune="head")
    pretrained = {**local_imagenet_weights, "conv1.weight": local_imagenet_weights["conv1.weight"].sum(dim=1, keepdim=True)}
    frozen = {name.removeprefix("encoder."): p for name, p in model.named_parameters() if not p.requires_grad}
    assert set(frozen) == {k for k in pretrained if not k.startswith("fc.") and "running" not in k and "num_batches" not in k}
    for name, param in frozen.items():
        assert torch.equal(param, pretrained[name]), name
    statistics = {k: v for k, v in model.encoder.state_dict().items() if "running" in k}
    assert all(torch.equal(v, pretrained[k]) for k, v in statistics.items())


def test_missing_imagenet_weights_offline_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # closed port: offline, deterministically
    with pytest.raises(UserError) as info:
        build_classifier(ModelSpec("resnet18", weights="imagenet"))
    assert "resnet18-f37072fd.pth" in str(info.value) and str(tmp_path / "hub" / "checkpoints") in str(info.value)


def test_imagenet_weights_need_resnet18():
    with pytest.raises(UserError, match="weights=imagenet needs model=resnet18"):
        build_classifier(ModelSpec("smallcnn", weights="imagenet"))


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    spec = ModelSpec("smallcnn", dropout=0.2)
    model = build_classifier(spec).eval()
    path = save_checkpoint(tmp_path / "best.pt", model, spec, {"lr": 0.001}, best_epoch=3)
    torch.load(path, weights_only=True)  # plain data: no pickled objects
    loaded, data = load_classifier(path, torch.device("cpu"))
    x = torch.rand(4, 1, 28, 28)
    assert torch.allclose(loaded(x), model(x)) and data["best_epoch"] == 3 and data["config"] == {"lr": 0.001}


def test_set_dropout_changes_the_layer_and_the_saved_spec(tmp_path):
    model = build_classifier(ModelSpec("smallcnn"))
    model.set_dropout(0.4)
    assert model.dropout.p == 0.4 and model.spec.dropout == 0.4
    save_checkpoint(tmp_path / "m.pt", model, model.spec, {})
    assert load_classifier(tmp_path / "m.pt", torch.device("cpu"))[0].dropout.p == 0.4


def test_corrupted_or_foreign_checkpoints_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="cannot be read as data"):
        load_classifier(tmp_path / "junk.pt", torch.device("cpu"))
    spec = ModelSpec("smallcnn")
    path = save_checkpoint(tmp_path / "wrong.pt", build_classifier(ModelSpec("resnet18")), spec, {})
    with pytest.raises(UserError, match="does not match the architecture smallcnn"):
        load_classifier(path, torch.device("cpu"))
