"""Tutorial 08 (the memory report) executes from top to bottom and says what it should."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("nbclient")

from notebook_runner import execute, images, kernel_env, number_after, text_output  # noqa: E402,F401

NOTEBOOK = "08_the_memory_report.ipynb"


@pytest.mark.slow  # about a minute unloaded (three models' reports in a kernel); tests/test_memory.py is the fast check
def test_08_the_memory_report(kernel_env):
    workdir, out = kernel_env
    notebook, _ = execute(NOTEBOOK, workdir)
    text = text_output(notebook)
    for name in ("qwen35-tiny", "mamba2-tiny", "rwkv7-tiny"):
        assert re.search(rf"{name}: median decay \S+, median write share \S+, heads keeping a write >= 10 tokens: "
                         r"\d+ of \d+", text), name
        assert (out / f"08_memory_{name}.png").read_bytes().startswith(b"\x89PNG")
        assert re.search(rf"{name}: layer \d+, head \d+\n  layer \d+ head \d+: a write keeps", text), name
    assert number_after("largest relative difference from the product of decays =", text) < 1e-3
    assert images(notebook) >= 2
