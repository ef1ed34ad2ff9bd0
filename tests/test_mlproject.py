"""MLproject and the click commands agree: every entry point exists, every parameter reaches an option."""

import importlib
import re

import yaml

from entrypoints.cli import cli
from tests.conftest import REPO

ENTRY_POINTS = {
    "eda",
    "baseline",
    "augment_ablation",
    "ssl_pretrain",
    "linear_probe",
    "ssl_finetune",
    "calibrate",
    "thresholds",
    "robustness",
    "compare",
    "study",
    "finetune_table",
}


def test_every_entry_point_is_declared_and_wired_to_its_command():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert set(project["entry_points"]) == ENTRY_POINTS
    for name, spec in project["entry_points"].items():
        command_line = spec["command"]
        assert command_line.startswith(f"python -m entrypoints.{name} "), name
        placeholders = set(re.findall(r"\{(\w+)\}", command_line))
        assert placeholders == set(spec["parameters"]), f"{name}: unused or undeclared parameters"
        options = {opt for param in importlib.import_module(f"entrypoints.{name}").command.params for opt in param.opts}
        for flag in re.findall(r"(--[\w-]+) \{", command_line):
            assert flag in options, f"{name}: {flag} is not an option of the click command"
        assert spec["parameters"]["dataset"]["default"] == "breastmnist"
        assert name in cli.commands or name.replace("_", "-") in cli.commands or name in {c.replace("-", "_") for c in cli.commands}
