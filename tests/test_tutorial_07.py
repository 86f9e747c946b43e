"""Tutorial 07 (SAEs spliced into the model) executes from top to bottom and says what it should: SAELens' names in
the cache, the error-term identity in both meanings (< 1e-5), a feature ablation that changes the head's state by
exactly -a_j A_j, and the refusals."""

from __future__ import annotations

import pytest

pytest.importorskip("nbclient")

from notebook_runner import execute, kernel_env, number_after, text_output  # noqa: E402,F401

NOTEBOOK = "07_splicing_saes.ipynb"


def test_07_splicing_saes(kernel_env):
    workdir, _ = kernel_env
    notebook, _ = execute(NOTEBOOK, workdir)
    text = text_output(notebook)
    assert "HookedQwen35 has add_sae: True" in text
    for hook in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"):
        assert ".mixer.hook_state.head" in text and f".{hook} " in text, hook
    assert "left as it is in mode='read': True" in text
    assert number_after("error term on, mode='read': max |difference| =", text) < 1e-5
    assert number_after("error term on, mode='state': max |difference| =", text) < 1e-5
    assert number_after("state change = -a_j A_j: max |error| =", text) < 1e-5
    read_change = number_after("max |logit change|", text)  # the first: mode="read"
    assert read_change > 1e-3  # without the error term the SAE's error reaches the outputs
    assert text.count("refused:") == 2
    assert "every head's state" in text and "hook_head_index" in text
