"""Tutorial 09 (feature dashboards) executes from top to bottom and says what it should."""

from __future__ import annotations

import pytest

pytest.importorskip("nbclient")

from notebook_runner import execute, kernel_env, text_output  # noqa: E402,F401

NOTEBOOK = "09_feature_dashboards.ipynb"


def test_09_feature_dashboards(kernel_env):
    workdir, out = kernel_env
    notebook, _ = execute(NOTEBOOK, workdir)
    text = text_output(notebook)
    assert "top contexts == top codes: True" in text
    assert "logit effect == closed form: True" in text
    assert "keys aligned with p:" in text and "values aligned with q:" in text
    assert "'freq_hist_data_bar_heights'" in text and "'pos_str'" in text
    pages = sorted((out / "09_dashboard" / "atoms").glob("atom_*.html"))
    assert len(pages) == 16
    assert "Content-Security-Policy" in (out / "09_dashboard" / "index.html").read_text(encoding="utf-8")
