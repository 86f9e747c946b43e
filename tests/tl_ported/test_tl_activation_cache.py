"""TransformerLens' ``ActivationCache`` on the three families.

Mirrors TransformerLens' tests/acceptance/test_activation_cache.py, rewritten for tiny random recurrent models (no
pretrained GPT-2): the logit attributions against a direct computation, accumulated and decomposed residual streams
(with and without the cached norm scales), batch-dimension removal and slicing, item access, stacking. Where the
original checks head or neuron results (``stack_head_results``, ``get_full_resid_decomposition``,
``stack_neuron_results``), a recurrent mixer has no per-head attention result to decompose: the port checks that
those methods refuse with the reason instead. ``decompose_resid`` names each block's sequence mixer by the hook it has
(``mixer_out`` on recurrent layers, ``attn_out`` on attention layers); its components must sum to the residual stream.
"""

import pytest
import torch
from transformer_lens import ActivationCache
from transformer_lens.utilities import get_act_name

from closeness import relative_error
from tl_helpers import random_tokens


def final_bias_logits(model, tokens):
    """What the final norm's bias adds to the logits of ``tokens`` (attributed to no component); 0 without bias."""
    bias = getattr(model.ln_final, "bias", None)
    if bias is None:
        return torch.zeros(tokens.shape)
    return (model.W_U[:, tokens].movedim(0, -1).float() * bias.float()).sum(-1)  # [*tokens.shape]


@pytest.fixture(scope="module")
def run(model):
    tokens = random_tokens(model, batch=2, n_pos=6)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return tokens, logits, cache


def test_run_with_cache_returns_transformer_lens_cache(model, run):
    tokens, logits, cache = run
    assert isinstance(cache, ActivationCache) and cache.model is model
    with torch.no_grad():
        plain_logits, plain = model.run_with_cache(tokens, return_cache_object=False)
    assert type(plain) is dict and list(plain) == list(cache.keys())
    assert all(torch.equal(plain[k], cache[k]) for k in plain)
    assert torch.equal(plain_logits, logits)


def test_act_names_resolve_for_every_hook(model, run):
    """``get_act_name(name, layer, slot)`` and ``cache[name, layer, slot]`` reach every cached block hook."""
    _, _, cache = run
    checked = 0
    for key in cache.keys():
        parts = key.split(".")
        if parts[0] != "blocks":
            continue
        layer, name = int(parts[1]), parts[-1].removeprefix("hook_")
        slot = ".".join(parts[2:-1]) or None
        assert get_act_name(name, layer, slot) == key
        assert cache[(name, layer, slot)] is cache[key]
        assert cache[(name, layer - model.cfg.n_layers, slot)] is cache[key]  # negative layers count from the end
        checked += 1
    assert checked >= 5 * model.cfg.n_layers
    assert cache["resid_pre", 0] is cache["blocks.0.hook_resid_pre"]
    assert cache["scale"] is cache["ln_final.hook_scale"]


def test_logit_attrs_match_a_direct_computation(model, run):
    """Attributions of the decomposed stream to the answer tokens at the last position: equal to the components
    divided by the cached final scale (centred for LayerNorm) dotted with the gain-weighted unembedding, and summing
    to the logits less the final norm's bias term."""
    tokens, logits, cache = run
    answers = torch.tensor([3, 7], device=tokens.device)
    wrong = torch.tensor([11, 2], device=tokens.device)
    stack = cache.decompose_resid(pos_slice=-1)  # [component, batch, d_model]
    attrs = cache.logit_attrs(stack, tokens=answers, pos_slice=-1)  # [component, batch]
    centred = stack - stack.mean(-1, keepdim=True) if model.cfg.normalization_type == "LN" else stack
    scale = cache["ln_final.hook_scale"][:, -1]  # [batch, 1]
    gain = model.final_norm_gain()
    reference = ((centred / scale) * (gain[:, None] * model.W_U[:, answers]).T).sum(-1)
    assert relative_error(attrs, reference) < 1e-5
    expected = logits[torch.arange(2), -1, answers] - final_bias_logits(model, answers)
    assert relative_error(attrs.sum(0), expected) < 1e-4
    diff = cache.logit_attrs(stack, tokens=answers, incorrect_tokens=wrong, pos_slice=-1)
    direct = logits[torch.arange(2), -1, answers] - logits[torch.arange(2), -1, wrong]
    direct = direct - final_bias_logits(model, answers) + final_bias_logits(model, wrong)
    assert relative_error(diff.sum(0), direct) < 1e-4
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, tokens=answers, incorrect_tokens=torch.tensor([1, 2, 3]), pos_slice=-1)


def test_logit_attrs_take_every_token_shape(model, run):
    """One int, a 0-d tensor, [batch] with a position slice, [batch, pos] on the full stack."""
    tokens, logits, cache = run
    full = cache.decompose_resid()  # [component, batch, pos, d_model]
    last = cache.decompose_resid(pos_slice=-1)
    assert cache.logit_attrs(last, tokens=5, pos_slice=-1).shape == (full.shape[0], 2)
    assert torch.allclose(cache.logit_attrs(last, tokens=torch.tensor(5), pos_slice=-1),
                          cache.logit_attrs(last, tokens=5, pos_slice=-1))
    per_position = cache.logit_attrs(full, tokens=tokens)  # each position's own token
    assert per_position.shape == (full.shape[0], 2, 6)
    picked = logits.gather(-1, tokens[..., None])[..., 0] - final_bias_logits(model, tokens)
    assert relative_error(per_position.sum(0), picked) < 1e-4


def test_accumulated_resid_ends_at_the_final_stream(model, run):
    _, logits, cache = run
    n = model.cfg.n_layers
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{i}_pre" for i in range(n)] + ["final_post"]
    for variant in (None, -1, n):
        assert torch.equal(cache.accumulated_resid(layer=variant), stack)
    assert torch.equal(stack[-1], cache["resid_post", n - 1])
    assert torch.equal(stack[1], cache["resid_pre", 1])
    # apply_ln on the final layer re-normalises every entry with ln_final: the last one gives the logits
    normed = cache.accumulated_resid(apply_ln=True)
    assert relative_error(model.unembed(normed[-1]), logits) < 1e-5
    # up to a layer: resid_pre of the earlier layers only
    assert cache.accumulated_resid(layer=1).shape[0] == 2


def test_apply_ln_recompute_differs_from_the_cached_scale(model, run):
    """Logit-lens normalisation (each entry re-normalised by ``ln_final``) is not the cached final scale applied to
    every entry; the two agree only on the final stream itself (up to the final norm's weight and bias)."""
    _, _, cache = run
    stack = cache.accumulated_resid()
    recomputed = cache.apply_ln_to_stack(stack, layer=None, recompute_ln=True)
    cached = cache.apply_ln_to_stack(stack, layer=None, recompute_ln=False)
    assert not torch.allclose(recomputed[0], cached[0], atol=1e-3)
    final_normed = model.ln_final(stack[-1])
    assert relative_error(recomputed[-1], final_normed) < 1e-6
    assert relative_error(cached[-1], cache["ln_final.hook_normalized"]) < 1e-5


def test_accumulated_resid_with_mid(model, run):
    _, _, cache = run
    if "blocks.0.hook_resid_mid" not in model.hook_dict:  # Mamba-2 blocks have no MLP, hence no resid_mid
        with pytest.raises(KeyError):
            cache.accumulated_resid(incl_mid=True)
        return
    stack, labels = cache.accumulated_resid(layer=2, incl_mid=True, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre"]
    assert torch.equal(stack[3], cache["resid_mid", 1])


def test_decompose_resid_sums_to_the_residual_stream(model, run):
    _, _, cache = run
    n = model.cfg.n_layers
    stack, labels = cache.decompose_resid(return_labels=True)
    assert relative_error(stack.sum(0), cache["resid_post", n - 1]) < 1e-5
    expected_labels = ["embed"]
    for layer in range(n):
        mixer = "mixer_out" if f"blocks.{layer}.hook_mixer_out" in model.hook_dict else "attn_out"
        expected_labels.append(f"{layer}_{mixer}")
        if f"blocks.{layer}.hook_mlp_out" in model.hook_dict:
            expected_labels.append(f"{layer}_mlp_out")
    assert labels == expected_labels
    assert relative_error(cache.decompose_resid(layer=2).sum(0), cache["resid_pre", 2]) < 1e-5
    if "blocks.1.hook_resid_mid" in model.hook_dict:
        assert relative_error(cache.decompose_resid(layer=1, mlp_input=True).sum(0), cache["resid_mid", 1]) < 1e-5
    # the sequence mixers and the MLPs partition the blocks' outputs
    mixers = cache.decompose_resid(mode="attn", incl_embeds=False)
    mlps_or_none = cache.decompose_resid(mode="mlp") if "blocks.0.hook_mlp_out" in model.hook_dict else None
    total = mixers.sum(0) + cache["hook_embed"]
    if mlps_or_none is not None:
        total = total + mlps_or_none[1:].sum(0)  # [0] is the embedding
    assert relative_error(total, cache["resid_post", n - 1]) < 1e-5
    with pytest.raises(ValueError, match="mode"):
        cache.decompose_resid(mode="heads")


def test_decompose_resid_with_apply_ln_uses_the_cached_scale(model, run):
    _, _, cache = run
    stack = cache.decompose_resid(layer=1)
    scaled = cache.decompose_resid(layer=1, apply_ln=True)
    centred = stack - stack.mean(-1, keepdim=True) if model.cfg.normalization_type == "LN" else stack
    assert relative_error(scaled, centred / cache["scale", 1, "ln1"]) < 1e-6
    # their sum is the normalised input of block 1 (the norm's output before its weight)
    assert relative_error(scaled.sum(0), cache["normalized", 1, "ln1"]) < 1e-4


def test_remove_batch_dim(model):
    tokens = random_tokens(model, batch=1, n_pos=5)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        _, removed_at_run = model.run_with_cache(tokens, remove_batch_dim=True)
    batched = {k: v.clone() for k, v in cache.items()}
    cache.remove_batch_dim()
    assert not cache.has_batch_dim and not removed_at_run.has_batch_dim
    for key, value in batched.items():
        assert torch.equal(cache[key], value[0])
        assert torch.equal(removed_at_run[key], value[0])


def test_remove_batch_dim_fails_if_batch_gt_1(run):
    _, _, cache = run
    with pytest.raises(AssertionError):
        ActivationCache(dict(cache.cache_dict), cache.model).remove_batch_dim()


def test_items_keys_values_and_retrieval(model, run):
    _, _, cache = run
    keys = list(cache.keys())
    assert len(cache) == len(keys) and list(cache) == keys
    assert [v for v in cache.values()][:3] == [cache[k] for k in keys[:3]]
    assert all(cache[k] is v for k, v in cache.items())
    assert cache["blocks.1.mixer.hook_state"].shape == (2, 6, model.cfg.n_heads, model.cfg.d_k * model.cfg.d_v) \
        if "blocks.1.mixer.hook_state" in keys else True
    assert cache["state", 1, "mixer"] is cache["blocks.1.mixer.hook_state"]


def test_apply_slice_to_batch_dim(run):
    _, _, cache = run
    second = cache.apply_slice_to_batch_dim(1)
    assert not second.has_batch_dim
    first_two = cache.apply_slice_to_batch_dim([0, 1])
    for key in cache.keys():
        assert torch.equal(second[key], cache[key][1])
        assert torch.equal(first_two[key], cache[key])


def test_toggle_autodiff(run):
    _, _, cache = run
    before = torch.is_grad_enabled()
    try:
        cache.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
        cache.toggle_autodiff(True)
        assert torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(before)


def test_stack_activation(model, run):
    _, _, cache = run
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape[0] == model.cfg.n_layers
    assert all(torch.equal(stacked[i], cache["resid_post", i]) for i in range(model.cfg.n_layers))
    states = cache.stack_activation("read", layer=2, sublayer_type="mixer")
    assert torch.equal(states[1], cache["blocks.1.mixer.hook_read"])


@pytest.mark.parametrize("method", ["compute_head_results", "stack_head_results", "get_full_resid_decomposition",
                                    "get_neuron_results", "stack_neuron_results"])
def test_head_and_neuron_decompositions_are_refused(run, method):
    _, _, cache = run
    with pytest.raises(NotImplementedError, match="per-head attention"):
        getattr(cache, method)(0) if "neuron" in method and method.startswith("get") else getattr(cache, method)()
