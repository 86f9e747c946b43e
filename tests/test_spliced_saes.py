"""SAEs spliced into the hooked models (writesae_lens.splicing), on all three families.

Each meaning of a state SAE is checked against a splice built by hand from the existing edit hooks:
- "read": a write-time addition of R_t - S_t and a post-read subtraction of the same matrix at every position
  (``hook_write_add`` / ``hook_post_read_add``): the read sees R_t, the recurrence keeps S_t;
- "state": the model fed one token at a time with its cache, a ``hook_state`` edit replacing the head's state by its
  reconstruction at each step (the closed loop).
The error-term identity (outputs equal the model without SAEs) is checked in both meanings. The API mirrors SAELens'
HookedSAETransformer (sae_lens/analysis/hooked_sae_transformer.py and its tests, rewritten for these models).
"""

import pytest
import torch
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

import writesae_lens.saes as ws
from family_models import family_model
from writesae_lens.splicing import with_sae_splicing

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["qwen35", "mamba2", "rwkv7"]
HEAD = 1


@pytest.fixture(params=FAMILIES)
def model(request, qwen35_pair, mamba2_pair):
    return with_sae_splicing(family_model(request.param, qwen35_pair, mamba2_pair))


def state_layer(model) -> int:
    return model.cfg.recurrent_layers[min(1, len(model.cfg.recurrent_layers) - 1)]


def state_sae(model, layer=None, head=HEAD, seed=0, d_sae=24, k=4):
    """A random WriteSAE on one head's state whose reconstructions are of the states' size (so they matter)."""
    layer = state_layer(model) if layer is None else layer
    cfg = model.cfg
    torch.manual_seed(seed)
    sae = ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=d_sae, d_k=cfg.d_k, d_v=cfg.d_v, k=k))
    with torch.no_grad():
        sae.b_enc.uniform_(0.0, 0.1)
    sae.cfg.metadata = SAEMetadata(hook_name=f"blocks.{layer}.mixer.hook_state", hook_head_index=head)
    return sae


def tokens_for(model, n_pos=9, batch=2, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (batch, n_pos), generator=torch.Generator().manual_seed(seed))


def states_of(model, tokens, layer, head):
    name = f"blocks.{layer}.mixer.hook_state"
    _, cache = model.run_with_cache(tokens, names_filter=name)
    return cache[name][:, :, head]  # [batch, pos, d_k * d_v]


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.detach().abs().max())))


# ---- the two meanings against splices built by hand -------------------------------------------------------------


def test_read_mode_equals_a_read_only_edit_by_hand(model):
    sae, tokens = state_sae(model), tokens_for(model)
    layer, cfg = state_layer(model), model.cfg
    with torch.no_grad():
        native = states_of(model, tokens, layer, HEAD)
        difference = (sae(native) - native).unflatten(-1, (cfg.d_k, cfg.d_v))  # [batch, pos, d_k, d_v]
        b, p = torch.meshgrid(torch.arange(tokens.shape[0]), torch.arange(tokens.shape[1]), indexing="ij")
        cells = torch.stack([b.flatten(), p.flatten(), torch.full_like(b.flatten(), HEAD)])
        matrices = difference.reshape(-1, cfg.d_k, cfg.d_v)

        def add(sign):
            return lambda edits, hook: edits + torch.sparse_coo_tensor(cells, sign * matrices, edits.shape,
                                                                             check_invariants=False)

        mixer = f"blocks.{layer}.mixer"
        by_hand = model.run_with_hooks(tokens, fwd_hooks=[(f"{mixer}.hook_write_add", add(1.0)),
                                                          (f"{mixer}.hook_post_read_add", add(-1.0))])
        spliced = model.run_with_saes(tokens, saes=sae, mode="read")
        baseline = model(tokens)
    close(spliced, by_hand)
    assert (spliced - baseline).abs().max() > 1e-3  # the SAE does change the outputs


def test_state_mode_equals_the_closed_loop_stepped_by_hand(model):
    sae, tokens = state_sae(model), tokens_for(model)
    layer = state_layer(model)

    def replace(states, hook):
        out = states.clone()
        out[:, :, HEAD] = sae(states[:, :, HEAD])
        return out

    with torch.no_grad():
        cache, steps = model.empty_cache(), []
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.mixer.hook_state", replace)]):
            for t in range(tokens.shape[1]):
                steps.append(model(tokens[:, t : t + 1], cache=cache))
        by_hand = torch.cat(steps, dim=1)
        spliced_cache = model.empty_cache()
        spliced = model.run_with_saes(tokens, saes=sae, mode="state", cache=spliced_cache)
        read = model.run_with_saes(tokens, saes=sae, mode="read")
    close(spliced, by_hand)
    close(spliced_cache.recurrent_state(layer), cache.recurrent_state(layer))
    assert (spliced - read).abs().max() > 1e-4  # the closed loop is not the open one


@pytest.mark.parametrize("mode", ["read", "state"])
def test_error_term_gives_the_model_without_saes(model, mode):
    tokens = tokens_for(model)
    layer = state_layer(model)
    other = state_sae(model, head=0, seed=3)
    with torch.no_grad():
        baseline = model(tokens, return_type="both")
        spliced = model.run_with_saes(tokens, saes=[state_sae(model), other], mode=mode, use_error_term=True,
                                      return_type="both")
        without = model.run_with_saes(tokens, saes=[state_sae(model)], mode=mode, return_type="both")
    close(spliced[0], baseline[0])
    close(spliced[1], baseline[1])
    assert (without[0] - baseline[0]).abs().max() > 1e-3
    assert model.acts_to_saes == {}  # run_with_saes leaves no splice behind
    assert layer in model.cfg.recurrent_layers


def test_feature_ablation_passes_through_the_error_term(model):
    """As in SAELens: the error term is computed without the SAE's hooks, so an edit of the features shows."""
    sae, tokens = state_sae(model), tokens_for(model)
    name = f"blocks.{state_layer(model)}.mixer.hook_state.head{HEAD}.hook_sae_acts_post"
    with torch.no_grad(), model.saes(saes=[sae], use_error_term=True):
        baseline = model(tokens)
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda acts, hook: torch.zeros_like(acts))])
        clean = model(tokens)
    assert (ablated - baseline).abs().max() > 1e-4
    close(clean, baseline)


# ---- cache names -----------------------------------------------------------------------------------------------


def test_cache_holds_the_sae_activations_under_saelens_names(model):
    sae, tokens = state_sae(model), tokens_for(model)
    layer = state_layer(model)
    prefix = f"blocks.{layer}.mixer.hook_state.head{HEAD}"
    with torch.no_grad():
        native = states_of(model, tokens, layer, HEAD)
        _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    for suffix in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
                   "hook_sae_error", "hook_sae_output"):
        assert f"{prefix}.{suffix}" in cache.keys(), suffix
    acts = cache[f"{prefix}.hook_sae_acts_post"]
    assert acts.shape == (*tokens.shape, sae.cfg.d_sae)
    close(acts, sae.encode(native))
    close(cache[f"{prefix}.hook_sae_output"], native)  # error term on: the output is the input
    close(cache[f"blocks.{layer}.mixer.hook_state"][:, :, HEAD], native)  # the hook itself keeps the model's states
    assert not any("sae" in name for name in model.hook_dict)  # gone again after the call


def test_plain_activation_sae_on_the_residual_stream(model):
    tokens = tokens_for(model)
    d_model = model.cfg.d_model
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=d_model, d_sae=16))
    sae.cfg.metadata = SAEMetadata(hook_name="blocks.1.hook_resid_pre")
    with torch.no_grad():
        by_hand = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: sae(x))])
        spliced, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        identity = model.run_with_saes(tokens, saes=[sae], use_error_term=True)
        baseline = model(tokens)
    close(spliced, by_hand)
    close(identity, baseline)
    assert cache["blocks.1.hook_resid_pre.hook_sae_acts_post"].shape == (*tokens.shape, 16)


# ---- lifecycle ---------------------------------------------------------------------------------------------------


def test_add_reset_and_the_context_restore_the_splices(model):
    tokens = tokens_for(model)
    first, second = state_sae(model, seed=1), state_sae(model, seed=2)
    layer = state_layer(model)
    key = f"blocks.{layer}.mixer.hook_state.head{HEAD}"
    with torch.no_grad():
        baseline = model(tokens)
        model.add_sae(first)
        with_first = model(tokens)
        assert model.acts_to_saes == {key: first}
        with model.saes(saes=[second]):
            assert model.acts_to_saes[key] is second
            with_second = model(tokens)
        assert model.acts_to_saes[key] is first
        close(model(tokens), with_first)
        model.reset_saes()
        close(model(tokens), baseline)
    assert (with_second - with_first).abs().max() > 1e-4
    assert not any("sae" in name for name in model.hook_dict)
    with pytest.raises(KeyError, match="no SAE is spliced"):
        model.reset_saes(key)


def test_generation_with_a_state_sae_is_the_closed_loop(model):
    """Generating with a state-mode SAE attached: the prompt's loop and every step continue from reconstructions."""
    tokens = tokens_for(model, n_pos=5, batch=1)
    sae = state_sae(model)
    model.add_sae(sae, mode="state")
    try:
        generated = model.generate(tokens, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
        with torch.no_grad():
            logits = model(generated)
    finally:
        model.reset_saes()
    assert torch.equal(logits[:, 4:-1].argmax(-1), generated[:, 5:])


# ---- refusals ----------------------------------------------------------------------------------------------------


def test_a_state_sae_without_a_head_is_refused(model):
    sae = state_sae(model)
    sae.cfg.metadata.hook_head_index = None
    with pytest.raises(ValueError, match="hook_head_index"):
        model.add_sae(sae)


def test_an_sae_as_a_plain_hook_is_refused(model):
    """Issue #14 part 3: ``(hook_state, sae)`` as a hook used to run one head's SAE on every head."""
    sae = state_sae(model)
    name = sae.cfg.metadata.hook_name
    with pytest.raises(ValueError, match="every head's state"), torch.no_grad():
        model.run_with_hooks(tokens_for(model), fwd_hooks=[(name, sae)])
    with pytest.raises(ValueError, match="add_sae"):
        model.add_hook(name, sae)
    with pytest.raises(ValueError, match="not a hook function"):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", sae)]):
            pass
    assert all(not point.fwd_hooks for point in model.hook_dict.values())


def test_bad_splices_are_refused(model):
    sae = state_sae(model)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.add_sae(sae, mode="both")
    sae.cfg.metadata.hook_head_index = model.cfg.n_heads
    with pytest.raises(ValueError, match="out of range"):
        model.add_sae(sae)
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_prez"
    with pytest.raises(KeyError, match="unknown hook point"):
        model.add_sae(sae)
    plain = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=8))
    plain.cfg.metadata = SAEMetadata(hook_name="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="takes no mode"):
        model.add_sae(plain, mode="state")
    wrong = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model + 1, d_sae=8))
    wrong.cfg.metadata = SAEMetadata(hook_name="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="d_in"), torch.no_grad():
        model.run_with_saes(tokens_for(model), saes=[wrong])
    other_shape = ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=model.cfg.d_k * model.cfg.d_v, d_sae=8,
                                                        d_k=model.cfg.d_v, d_v=model.cfg.d_k, k=2))
    other_shape.cfg.metadata = SAEMetadata(hook_name=f"blocks.{state_layer(model)}.mixer.hook_state",
                                           hook_head_index=0)
    with pytest.raises(ValueError, match="trained on another model"):
        model.add_sae(other_shape)
    assert model.acts_to_saes == {}
