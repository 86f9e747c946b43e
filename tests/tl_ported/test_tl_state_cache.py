"""Continuing from a cache on the three families: TransformerLens' key-value cache, as our state cache.

Mirrors TransformerLens' tests/integration/test_kv_cache.py. A recurrent layer's cache is its matrix state and conv
window, not keys and values, so the port uses ``RecurrentCache`` (``model.empty_cache()``) under TransformerLens' own
keyword ``past_kv_cache=``; the comparisons are the original's (a prefix run with the cache, then the rest, equals one
run over everything), at fp32 precision (1e-5 relative) instead of the original's pretrained-model tolerances.
Adapted:

- multi-token batches: a left-padded prefix (or none) then an unpadded continuation are supported and must match;
  right padding before a continuation, and padding on a continuation call (the original's custom attention mask with
  a pad inside the sequence), would leave pads inside each row's recurrence: they are refused with a clear error;
- ``freeze()`` / ``unfreeze()``: a frozen cache is read without being updated (states and attention keys stay as they
  were), so two caches frozen at the same point give the same continuation;
- ``start_at_layer``: the residual stream cached from a frozen cache's continuation, run on from layer 2 with the same
  frozen cache, gives the full run's logits (RWKV-7 also carries layer 0's v-first stream).
"""

import pytest
import torch

from closeness import relative_error
from tl_helpers import random_tokens


def prefix_and_rest(model, batch=1, n_pre=6, n_new=4, seed=2):
    tokens = random_tokens(model, batch=batch, n_pos=n_pre + n_new, seed=seed)
    return tokens, tokens[:, :n_pre], tokens[:, n_pre:]


@torch.no_grad()
def test_single_new_token(model):
    tokens, pre, _ = prefix_and_rest(model, n_new=1)
    full = model(tokens)
    cache = model.empty_cache()
    model(pre, past_kv_cache=cache)
    step = model(tokens[:, -1:], past_kv_cache=cache)
    assert relative_error(step, full[:, -1:]) < 1e-5
    assert cache.seq_len == tokens.shape[1]


@torch.no_grad()
def test_multiple_new_tokens(model):
    tokens, pre, new = prefix_and_rest(model)
    full = model(tokens)
    cache = model.empty_cache()
    model(pre, past_kv_cache=cache)
    assert relative_error(model(new, past_kv_cache=cache), full[:, -new.shape[1]:]) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("pre_padding", ["left", None])
def test_multi_token_batch(model, pre_padding):
    """Row 0's prefix is shorter than row 1's (left-padded) or not; the continuation of row 0 equals its full run."""
    generator = torch.Generator().manual_seed(3)
    pre_lengths = (3, 6) if pre_padding else (6, 6)
    rows = [torch.randint(0, model.cfg.d_vocab, (n,), generator=generator) for n in pre_lengths]
    new = torch.randint(0, model.cfg.d_vocab, (2, 4), generator=generator)
    pre = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, row in enumerate(rows):
        pre[i, 6 - len(row):], mask[i, 6 - len(row):] = row, 1
    cache = model.empty_cache()
    model(pre, past_kv_cache=cache, attention_mask=mask if pre_padding else None)
    cache.freeze()
    continued = model(new, past_kv_cache=cache)
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, new[i]])[None])[0, -4:]
        assert relative_error(continued[i], alone) < 1e-5


def test_padding_that_would_sit_inside_the_recurrence_is_refused(model):
    cache = model.empty_cache()
    with pytest.raises(ValueError, match="right padding cannot be used with a cache"):
        model(torch.zeros(2, 4, dtype=torch.long), past_kv_cache=cache,
              attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    model(torch.zeros(1, 3, dtype=torch.long), past_kv_cache=cache)
    with pytest.raises(ValueError, match="starts a sequence"):  # a custom mask on a continuation
        model(torch.zeros(1, 4, dtype=torch.long), past_kv_cache=cache,
              attention_mask=torch.tensor([[0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="same side"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 0, 1]]))


@torch.no_grad()
def test_freeze_cache(model):
    tokens, pre, new_1 = prefix_and_rest(model, seed=4)
    new_2 = random_tokens(model, n_pos=5, seed=5)
    cache_1, cache_2 = model.empty_cache(), model.empty_cache()
    model(pre, past_kv_cache=cache_1)
    cache_1.freeze()
    logits_1 = model(new_1, past_kv_cache=cache_1)
    model(pre, past_kv_cache=cache_2)
    cache_2.freeze()
    model(new_2, past_kv_cache=cache_2)
    # frozen at the same point: the same states, windows and keys, whatever ran on them since
    assert cache_1.seq_len == cache_2.seq_len == pre.shape[1]
    for layer_1, layer_2 in zip(cache_1.layers, cache_2.layers):
        assert layer_1.keys() == layer_2.keys()
        for name in layer_1:
            assert torch.equal(layer_1[name], layer_2[name]), name
    assert torch.equal(model(new_1, past_kv_cache=cache_2), logits_1)
    assert relative_error(logits_1, model(tokens)[:, -new_1.shape[1]:]) < 1e-5
    # unfrozen, the cache moves on: the same tokens now continue from a longer prefix
    cache_2.unfreeze()
    again = model(new_1, past_kv_cache=cache_2)
    assert torch.equal(again, logits_1) and cache_2.seq_len == pre.shape[1] + new_1.shape[1]
    assert not torch.allclose(model(new_1, past_kv_cache=cache_2), logits_1, atol=1e-4)


@torch.no_grad()
def test_cache_and_start_at_layer(model):
    tokens, pre, new = prefix_and_rest(model, n_new=1, seed=6)
    full = model(tokens)
    cache = model.empty_cache()
    model(pre, past_kv_cache=cache)
    cache.freeze()
    names = ["blocks.1.hook_resid_post", *model.carried_streams.values()]
    resid, acts = model.run_with_cache(new, stop_at_layer=2, past_kv_cache=cache, names_filter=names)
    assert torch.equal(resid, acts["resid_post", 1])  # the stream entering block 2
    extra = {kw: acts[name] for kw, name in model.carried_streams.items()}
    logits = model(resid, start_at_layer=2, tokens=new, past_kv_cache=cache, **extra)
    assert relative_error(logits, full[:, -1:]) < 1e-5
    with pytest.raises(ValueError, match="frozen cache"):  # an unfrozen cache would be left half-updated
        model(new, stop_at_layer=2, past_kv_cache=model.empty_cache())
