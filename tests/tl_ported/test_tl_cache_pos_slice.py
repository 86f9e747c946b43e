"""``run_with_cache(..., pos_slice=...)`` on the three families.

Mirrors TransformerLens' tests/integration/test_cache_pos_slice.py (keep-batch and remove-batch variants): for
positions 0, the middle, the last and -1, every cached activation of the sliced run equals the unsliced run's at that
position. The original lists GPT-2's hooks by hand; this port walks every cached key, and slices each on its own
position axis (the query axis of attention scores and patterns, dim 1 elsewhere).
"""

import pytest
import torch

from tl_helpers import random_tokens

N_POS = 7


@pytest.fixture(scope="module")
def unsliced(model):
    tokens = random_tokens(model, n_pos=N_POS, seed=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, return_type=None)
    return tokens, cache


@pytest.mark.parametrize("position", [0, N_POS // 2, N_POS - 1, -1])
@pytest.mark.parametrize("remove_batch_dim", [False, True])
def test_run_with_cache_pos_slice(model, unsliced, position, remove_batch_dim):
    tokens, full = unsliced
    with torch.no_grad():
        _, sliced = model.run_with_cache(tokens, return_type=None, pos_slice=position,
                                         remove_batch_dim=remove_batch_dim)
    assert list(sliced.keys()) == list(full.keys())
    assert sliced["embed"].shape == ((1, model.cfg.d_model) if remove_batch_dim else (1, 1, model.cfg.d_model))
    for key in full.keys():
        axis = model.hook_pos_axis(key)
        expected = full[key].select(axis, position).unsqueeze(axis)
        got = sliced[key]
        if remove_batch_dim:
            expected = expected[0]
        assert got.shape == expected.shape, key
        assert torch.equal(got, expected), key
    if model.cfg.attention_layers:  # patterns keep every key position and one query
        assert sliced["pattern", model.cfg.attention_layers[0]].shape[-2:] == (1, N_POS)
