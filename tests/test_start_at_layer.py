"""Running from a later layer, every family: the residual stream (plus the streams a family carries past its layers,
``carried_streams``) reproduces the full run; the final residual with a cache; clear errors."""

import pytest
import torch

from rwkv7_factory import random_rwkv7


@pytest.fixture(scope="module", params=["qwen35", "mamba2", "rwkv7"])
def model(request, qwen35_pair, mamba2_pair):
    if request.param == "rwkv7":
        return random_rwkv7(97)
    return {"qwen35": qwen35_pair, "mamba2": mamba2_pair}[request.param][1]


def carried(model, cache):
    return {name: cache[hook] for name, hook in model.carried_streams.items()}


def test_start_at_each_layer_equals_the_full_run(model):
    tokens = torch.randint(0, 90, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, cache = model.run_with_cache(tokens)
        for layer in range(1, model.cfg.n_layers):
            resid = cache[f"blocks.{layer}.hook_resid_pre"]
            later = model(resid, start_at_layer=layer, **carried(model, cache))
            assert (later - full).abs().max() <= 1e-5 * full.abs().max()


def test_final_residual_with_a_cache_continues_like_logits(model):
    tokens = torch.randint(0, 90, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = model.empty_cache()
        final = model(tokens[:, :7], stop_at_layer=model.cfg.n_layers, cache=cache)
        assert cache.seq_len == 7 and final.shape == (2, 7, model.cfg.d_model)
        assert torch.allclose(model.unembed(model.ln_final(final)), full[:, :7], atol=1e-5)
        rest = model(tokens[:, 7:], cache=cache)
        assert torch.allclose(rest, full[:, 7:], atol=1e-4)
        with pytest.raises(ValueError, match="stop_at_layer"):
            model(tokens, stop_at_layer=1, cache=model.empty_cache())


def test_rwkv7_needs_v_first_from_a_later_layer():
    model = random_rwkv7(97)
    tokens = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        resid = cache["blocks.1.hook_resid_pre"]
        with pytest.raises(ValueError, match="v-first.*pass v_first"):
            model(resid, start_at_layer=1)
        with pytest.raises(ValueError, match=r"v_first has shape \(1, 4, 4, 24\); expected \(1, 5, 4, 24\)"):
            model(resid, start_at_layer=1, v_first=cache["blocks.0.mixer.hook_v_first"][:, :4])
        with pytest.raises(ValueError, match="only taken with start_at_layer > 0"):
            model(tokens, v_first=cache["blocks.0.mixer.hook_v_first"])
