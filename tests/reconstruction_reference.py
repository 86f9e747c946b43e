"""The straightforward reconstruction protocol (the authors' scripts): per passage and condition, the prefix rerun at
batch 1, the layer's state replaced in its cache, the suffix loss. The reference of tests/test_reconstruction.py and
the baseline of bench/bench_reconstruction.py."""

from __future__ import annotations

import torch

from writesae_lens.evaluation.cache_reconstruction import apply_splice


@torch.no_grad()
def straightforward(model, layer: int, tokens, conditions, prefix_len: int) -> dict[tuple[int, str], float]:
    """Mean suffix NLL per (passage, condition), conditions run one by one from a fresh prefix pass."""
    out = {}
    for p in range(tokens.shape[0]):
        for name in ["native", *conditions]:
            cache = model.empty_cache()
            model(tokens[p : p + 1, :prefix_len], cache=cache)
            if name != "native":
                cache.layers[layer]["state"] = apply_splice(cache.layers[layer]["state"], conditions[name])
            nll = model(tokens[p : p + 1, prefix_len:], cache=cache, return_type="loss", loss_per_token=True)
            out[(p, name)] = float(nll.double().mean())
    return out
