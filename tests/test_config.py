"""Config resolution: layering order, type coercion, validation messages, hashing."""

import pytest

from pipeline import config
from pipeline.errors import UserError


def test_defaults_then_dataset_override_then_cli():
    base = config.resolve("baseline", "breastmnist", {})
    assert base["epochs"] == 30  # configs/datasets/breastmnist.yaml beats configs/baseline.yaml (20)
    assert config.resolve("baseline", "pneumoniamnist", {})["epochs"] == 15
    cli = config.resolve("baseline", "breastmnist", {"epochs": "3", "lr": "1e-4", "seed": ""})
    assert cli["epochs"] == 3 and cli["lr"] == pytest.approx(1e-4) and cli["seed"] == base["seed"]


def test_user_file_sits_between_dataset_and_cli(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 7\nmodel: resnet18\n")
    cfg = config.resolve("baseline", "breastmnist", {"model": "smallcnn"}, config_file=str(path))
    assert cfg["epochs"] == 7 and cfg["model"] == "smallcnn"


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"size": "32"}, "size=32 must be one of 28, 64, 128, 224"),
        ({"epochs": "0"}, "epochs=0 must be >= 1"),
        ({"batch_size": "0"}, "batch_size=0 must be >= 2"),
        ({"lr": "0"}, "lr=0.0 must be > 0"),
        ({"lr": "-1e-3"}, "must be > 0"),
        ({"lr": "fast"}, "lr='fast' is not a valid finite float"),
        ({"lr": "inf"}, "lr='inf' is not a valid finite float"),
        ({"epochs": "2.5"}, "epochs='2.5' is not a valid int"),
        ({"model": "vgg"}, "model='vgg' must be one of smallcnn, resnet18"),
        ({"stem": "wide"}, "stem='wide' must be one of cifar, imagenet"),
        ({"finetune": "some"}, "finetune='some' must be one of head, all"),
        ({"weights": "random"}, "weights='random' must be one of auto, none, imagenet"),
        ({"label_fraction": "1.5"}, "must be in (0, 1]"),
        ({"augment": "mixup"}, "augment='mixup' must be one of none, flip, geometric"),
    ],
)
def test_bad_values_name_key_value_and_rule(overrides, fragment):
    with pytest.raises(UserError, match=None) as info:
        config.resolve("baseline", "breastmnist", overrides)
    assert fragment in str(info.value)


def test_unknown_key_in_user_file_is_refused(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(UserError, match="unknown baseline setting 'epoch'"):
        config.resolve("baseline", "breastmnist", {}, config_file=str(path))


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        config.resolve("baseline", "breastmnist", {}, config_file=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.resolve("baseline", "breastmnist", {}, config_file=str(bad))


def test_hash_is_stable_and_sensitive():
    a = config.resolve("baseline", "breastmnist", {})
    assert config.config_hash(a) == config.config_hash(dict(reversed(list(a.items()))))
    assert config.config_hash(a) != config.config_hash({**a, "seed": 1})


def test_probe_supervised_augment_is_checked_before_any_training():
    with pytest.raises(UserError, match="supervised_augment='rotate' must be one of none, flip"):
        config.resolve("linear_probe", "breastmnist", {"supervised_augment": "rotate"})


@pytest.mark.parametrize(
    "stage, text, fragment",
    [
        ("baseline", "epochs: true\n", "epochs=True is not a valid int"),  # YAML booleans are not numbers
        ("baseline", "lr: .inf\n", "lr=inf is not a valid finite float"),
        ("baseline", "amp: 5\n", "amp=5 is not a valid bool (true/false)"),
        ("linear_probe", "seeds: [0, 0]\n", "seeds=[0, 0] must not repeat a value"),  # a fake spread over one seed
        ("linear_probe", "label_fractions: [0.1, 0.1]\n", "label_fractions=[0.1, 0.1] must not repeat a value"),
    ],
)
def test_yaml_values_of_the_wrong_kind_or_repeated(stage, text, fragment, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        config.resolve(stage, "breastmnist", {}, config_file=str(path))
    assert fragment in str(info.value)


def test_head_only_training_defaults_to_imagenet_weights_and_refuses_a_random_encoder():
    assert config.resolve("baseline", "breastmnist", {"model": "resnet18", "finetune": "head"})["weights"] == "imagenet"
    assert config.resolve("baseline", "breastmnist", {"model": "resnet18"})["weights"] == "none"
    for overrides in ({"model": "resnet18", "finetune": "head", "weights": "none"}, {"model": "smallcnn", "finetune": "head"}):
        with pytest.raises(UserError, match="finetune=head trains only a linear head on a frozen encoder, so it needs pretrained weights"):
            config.resolve("baseline", "breastmnist", overrides)


@pytest.mark.parametrize("profile", ["quick", "paper", "full"])
@pytest.mark.parametrize("dataset", ["breastmnist", "pneumoniamnist"])
def test_a_profiles_ssl_step_budget_holds_on_every_dataset(profile, dataset):
    """A dataset's defaults must not turn a profile's measured step budget back into epochs
    (`epochs` > 0 replaces `steps`): PneumoniaMNIST's 15 epochs had cut the paper profile's 800 steps to 270."""
    from pipeline.pretrain import PretrainSettings

    cfg = config.resolve("ssl_pretrain", dataset, {}, profile=profile)
    wanted = config.load_profile(profile)["ssl_pretrain"]["steps"]
    assert cfg["epochs"] == 0 and PretrainSettings.of(cfg).total_steps(4708) == wanted


def test_positive_class_defaults_to_the_datasets_finding(tmp_path):
    assert config.resolve("thresholds", "breastmnist", {})["positive_class"] == 0  # malignant
    assert config.resolve("thresholds", "pneumoniamnist", {})["positive_class"] == 1  # pneumonia
    assert config.resolve("thresholds", "pneumoniamnist", {"positive_class": "finding"})["positive_class"] == 1
    assert config.resolve("thresholds", "breastmnist", {"positive_class": "1"})["positive_class"] == 1
    path = tmp_path / "mine.yaml"
    path.write_text("positive_class: 0\n")
    assert config.resolve("thresholds", "pneumoniamnist", {}, config_file=str(path))["positive_class"] == 0
    with pytest.raises(UserError, match=r"positive_class='2' must be 0, 1 or finding"):
        config.resolve("thresholds", "breastmnist", {"positive_class": "2"})


def test_a_child_config_follows_every_setting_its_parent_shares_with_the_childs_stage():
    parent = config.resolve("linear_probe", "breastmnist", {"eval_batch_size": 256, "deterministic": True, "lr": 0.01})
    child = config.derive(parent, {"seed": 3, "augment": parent["supervised_augment"]}, stage="baseline")
    assert (child["eval_batch_size"], child["deterministic"], child["lr"], child["seed"]) == (256, True, 0.01, 3)
    assert "probe_cs" not in child and child["augment"] == "flip" and child["dataset"] == "breastmnist"
    with pytest.raises(UserError, match="seed"):
        config.derive(parent, {"seed": -1}, stage="baseline")
