"""Notebook 04 (the closed-form logit shift) executes and says what it should."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from notebook_runner import execute, images, kernel_env, text_output  # noqa: E402,F401


def test_04_the_closed_form(kernel_env):
    workdir, out = kernel_env
    notebook, _ = execute("04_the_closed_form.ipynb", workdir)
    text = text_output(notebook)
    engine_vs_hooks = float(re.search(r"engine vs hook path, largest difference: (\S+)", text).group(1))
    assert engine_vs_hooks < 1e-4
    assert "Closed-form logit shift" in text and "single-position sign prediction" in text
    assert re.search(r"first_order\s+\d+", text)
    for name in ("04_measured_vs_predicted.png", "04_r2_by_rank.png", "04_r2_by_horizon.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert images(notebook) >= 3
