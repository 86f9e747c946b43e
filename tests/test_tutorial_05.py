"""Tutorial 05 (what the dictionary is) executes from top to bottom and says what it should."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("nbclient")

from notebook_runner import execute, images, kernel_env, number_after, text_output  # noqa: E402,F401

NOTEBOOK = "05_what_the_dictionary_is.ipynb"


def test_05_what_the_dictionary_is(kernel_env):
    workdir, out = kernel_env
    notebook, _ = execute(NOTEBOOK, workdir)
    text = text_output(notebook)
    factorised = re.search(r"factorised (\S+), materialised (\S+)", text)
    assert factorised and abs(float(factorised.group(1)) - float(factorised.group(2))) < 1e-5
    assert "Register / bundle partition" in text and "BIC(2)" in text
    assert number_after("identity check: max |loss difference| =", text) < 1e-6
    assert "4 substitutes compared" in text
    assert "KS contrasts: 3, Holm-adjusted" in text
    matched = re.search(r"seed 0 atoms matched in seed 1 \(\|cos\| > 0.9\): (\S+)% best match, (\S+)% one-to-one", text)
    assert matched and 0 <= float(matched.group(2)) <= float(matched.group(1)) <= 100
    for name in ("writesae", "flat_svd_reconstruction", "flat_svd_atom", "rank2", "svd_rank_1"):
        assert name in text, name
    assert re.search(r"delete [-+]\d\.\d+ bits/token, random [-+]\d\.\d+ bits/token", text)
    for name in ("05_cosine_histogram.png", "05_reconstruction.png", "05_cosine_ecdfs.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert images(notebook) >= 3
