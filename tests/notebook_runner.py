"""Executing the tutorial notebooks in tests (used by test_tutorials.py and each chapter's test).

Each notebook runs in a fresh kernel of this interpreter (a kernelspec created under a temporary JUPYTER_PATH, so
the venv's python runs it whatever the machine's default kernel is), in a temporary working directory, with its
figures written to a temporary folder (WRITESAE_TUTORIAL_OUT). Use the ``kernel_env`` fixture (import it into the
test module) and ``execute(name, workdir)``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
KERNEL = "writesae-tutorials-test"
CELL_TIMEOUT_S = 180


def load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", TUTORIALS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def kernel_env(tmp_path, monkeypatch):
    """A kernelspec that runs `sys.executable`, and the environment the notebook kernel inherits."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "writesae-lens tutorials (test)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    out = tmp_path / "out"
    monkeypatch.setenv("WRITESAE_TUTORIAL_OUT", str(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
    workdir = tmp_path / "work"
    workdir.mkdir()
    return workdir, out


def execute(name: str, workdir: Path):
    notebook = nbformat.read(TUTORIALS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(workdir)}}
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    print(f"{name}: executed in {elapsed:.1f} s")
    return notebook, elapsed


def text_output(notebook) -> str:
    """All stream and plain-text outputs of the executed notebook, in order."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif "data" in output and "text/plain" in output.data:
                parts.append(output.data["text/plain"])
    return "\n".join(parts)


def images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def number_after(label: str, text: str) -> float:
    match = re.search(re.escape(label) + r"\s*([-+0-9.eE]+|nan)", text)
    assert match, f"{label!r} not found in the notebook's output"
    return float(match.group(1))


