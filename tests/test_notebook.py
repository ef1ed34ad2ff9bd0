"""The Colab notebook is valid nbformat 4 and its code path (all but the Colab setup cell) runs."""

import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, all_runs

NOTEBOOK = REPO / "notebooks" / "colab_quickstart.ipynb"


def code_cells(notebook):
    return [c for c in notebook["cells"] if c["cell_type"] == "code"]


def test_notebook_is_valid_nbformat4():
    notebook = json.loads(NOTEBOOK.read_text())
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    for cell in notebook["cells"]:
        assert cell["cell_type"] in {"code", "markdown"} and isinstance(cell["source"], list) and cell["id"]
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    tags = [c["metadata"].get("tags", []) for c in code_cells(notebook)]
    assert ["colab-setup"] in tags and ["parameters"] in tags
    for cell in code_cells(notebook):
        if "colab-setup" not in cell["metadata"]["tags"]:
            compile("".join(cell["source"]), "cell", "exec")


@pytest.mark.slow
def test_notebook_code_path_runs_the_smoke_study(synthetic_root, tracking_uri, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDMNIST_ROOT", str(synthetic_root))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    notebook = json.loads(NOTEBOOK.read_text())
    namespace = {}
    for cell in code_cells(notebook):
        if "colab-setup" in cell["metadata"]["tags"]:
            continue
        exec("".join(cell["source"]), namespace)
        if "parameters" in cell["metadata"]["tags"]:
            namespace.update(PROFILE="smoke", PROJECT=str(REPO), OUT=str(tmp_path / "reports"))
    assert "12 tables, the draft (draft.md, draft.tex) and the slides (slides.tex)" in capsys.readouterr().out
    study = [r for r in all_runs(tracking_uri) if r.data.tags["stage"] == "study"]
    assert len(study) == 1 and study[0].info.status == "FINISHED"
