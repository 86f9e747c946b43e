"""Tutorial 06 (cache edits that steer generation) executes from top to bottom and says what it should."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("nbclient")

from notebook_runner import execute, images, kernel_env, number_after, text_output  # noqa: E402,F401

NOTEBOOK = "06_steering_generation.ipynb"


def test_06_steering_generation(kernel_env):
    workdir, out = kernel_env
    notebook, _ = execute(NOTEBOOK, workdir)
    text = text_output(notebook)
    assert text.count("padded row == alone: True") == 2
    assert "batched row == alone: True" in text
    native = number_after("log p(' river') at the first generated token: native", text)
    assert re.search(r"edited (-?\d+\.\d+)", text)
    assert native < 0
    assert "Three-position install" in text and re.search(r"\d+ trials", text)
    assert "Single-atom erasure, feature" in text and "Wilcoxon p =" in text
    assert "Amplification probe" in text and "random 10x" in text
    assert (out / "06_inclusion.png").read_bytes().startswith(b"\x89PNG")
    assert images(notebook) >= 1
