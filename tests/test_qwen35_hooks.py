"""Hook points of HookedQwen35: shapes, the identities that define them, caching, lifecycle, continuity."""

import pytest
import torch

from closeness import relative_error


LAYER = 2


@pytest.fixture(scope="module")
def model(qwen35_pair):
    return qwen35_pair[1]


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 100, (2, 70), generator=torch.Generator().manual_seed(21))


@pytest.fixture(scope="module")
def full_cache(model, tokens):
    with torch.no_grad():
        return model.run_with_cache(tokens)[1]


def test_hook_shapes(model, full_cache):
    cfg = model.cfg
    b, p = 2, 70
    m = f"blocks.{LAYER}.mixer."
    expected = {
        "hook_embed": (b, p, cfg.d_model),
        f"blocks.{LAYER}.hook_resid_pre": (b, p, cfg.d_model),
        f"blocks.{LAYER}.hook_mixer_out": (b, p, cfg.d_model),
        m + "hook_write_k": (b, p, cfg.n_heads, cfg.d_k),
        m + "hook_write_v": (b, p, cfg.n_heads, cfg.d_v),
        m + "hook_write_beta": (b, p, cfg.n_heads),
        m + "hook_decay": (b, p, cfg.n_heads),
        m + "hook_read_q": (b, p, cfg.n_heads, cfg.d_k),
        m + "hook_state": (b, p, cfg.n_heads, cfg.d_k * cfg.d_v),
        m + "hook_read": (b, p, cfg.n_heads, cfg.d_v),
        m + "hook_gate": (b, p, cfg.n_heads, cfg.d_v),
        "blocks.3.attn.hook_q": (b, p, cfg.n_attn_heads, cfg.d_head),
        "blocks.3.attn.hook_k": (b, p, cfg.n_kv_heads, cfg.d_head),
        "blocks.3.attn.hook_pattern": (b, cfg.n_attn_heads, p, p),
        "blocks.3.attn.hook_z": (b, p, cfg.n_attn_heads, cfg.d_head),
        "blocks.3.attn.hook_gate": (b, p, cfg.n_attn_heads, cfg.d_head),
        "blocks.3.hook_attn_out": (b, p, cfg.d_model),
        "blocks.3.mlp.hook_post": (b, p, cfg.d_mlp),
        "ln_final.hook_normalized": (b, p, cfg.d_model),
    }
    for name, shape in expected.items():
        assert tuple(full_cache[name].shape) == shape, name
    assert not any(name.endswith(("hook_write_add", "hook_post_read_add")) for name in full_cache)


def test_write_hooks_define_the_recurrence(model, full_cache):
    """From one run_with_cache: S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T and read_t = S_t^T q_t."""
    m = f"blocks.{LAYER}.mixer."
    k, v, beta, g, q = (full_cache[m + n] for n in ("hook_write_k", "hook_write_v", "hook_write_beta", "hook_decay",
                                                    "hook_read_q"))
    cfg = model.cfg
    states = full_cache[m + "hook_state"].reshape(*k.shape[:3], cfg.d_k, cfg.d_v)
    previous = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)
    a = g.exp()[..., None, None]
    erase = beta[..., None, None] * k[..., :, None] * torch.einsum("bphkv,bphk->bphv", previous, k)[..., None, :]
    write = beta[..., None, None] * k[..., :, None] * v[..., None, :]
    predicted = a * (previous - erase) + write
    assert relative_error(predicted, states) <= 1e-5
    assert relative_error(torch.einsum("bphkv,bphk->bphv", states, q), full_cache[m + "hook_read"]) <= 1e-5
    # key normalisation and the query scale are part of the hook definitions
    assert torch.allclose(k.norm(dim=-1), torch.ones(()), atol=1e-4)
    assert torch.allclose(q.norm(dim=-1), torch.full((), cfg.d_k**-0.5), atol=1e-4)


def test_key_heads_are_repeated_to_value_heads(model, full_cache):
    k = full_cache[f"blocks.{LAYER}.mixer.hook_write_k"]
    repeat = model.cfg.n_heads // model.cfg.n_key_heads
    assert repeat == 2
    assert torch.equal(k[:, :, 0], k[:, :, 1]) and torch.equal(k[:, :, 2], k[:, :, 3])
    assert not torch.equal(k[:, :, 1], k[:, :, 2])


def test_residual_identities(model, full_cache):
    for layer in range(model.cfg.n_layers):
        pre, mid, post = (full_cache[f"blocks.{layer}.hook_resid_{x}"] for x in ("pre", "mid", "post"))
        mixer = full_cache[f"blocks.{layer}.hook_{'attn' if layer == 3 else 'mixer'}_out"]
        assert torch.allclose(pre + mixer, mid, atol=1e-6)
        assert torch.allclose(mid + full_cache[f"blocks.{layer}.hook_mlp_out"], post, atol=1e-6)
        if layer:
            assert torch.equal(full_cache[f"blocks.{layer - 1}.hook_resid_post"], pre)
    assert torch.equal(full_cache["hook_embed"], full_cache["blocks.0.hook_resid_pre"])


def test_pos_slice_slices_the_position_axis(model, tokens, full_cache):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, pos_slice=(5, 9),
                                        names_filter=lambda n: n.endswith(("mixer.hook_write_k", "hook_pattern",
                                                                           "hook_resid_pre", "mixer.hook_write_beta")))
    name = f"blocks.{LAYER}.mixer.hook_write_k"
    assert torch.equal(cache[name], full_cache[name][:, 5:9])
    beta = f"blocks.{LAYER}.mixer.hook_write_beta"
    assert torch.equal(cache[beta], full_cache[beta][:, 5:9])
    assert torch.equal(cache["blocks.3.attn.hook_pattern"], full_cache["blocks.3.attn.hook_pattern"][:, :, 5:9])
    with torch.no_grad():
        _, single = model.run_with_cache(tokens[:1], remove_batch_dim=True, pos_slice=-1, names_filter=name)
    assert torch.allclose(single[name], full_cache[name][0, -1:], atol=1e-6)  # transformer_lens keeps the axis for an int


def test_prefix_then_continue_equals_full_run(model, tokens):
    with torch.no_grad():
        full = model(tokens)
        cache = model.empty_cache()
        parts = [model(tokens[:, a:b], cache=cache) for a, b in ((0, 33), (33, 34), (34, 70))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=2e-5)
    assert cache.seq_len == 70
    state = cache.recurrent_state(LAYER)
    assert state.shape == (2, model.cfg.n_heads, model.cfg.d_k, model.cfg.d_v)
    with pytest.raises(KeyError, match="no recurrent state"):
        cache.recurrent_state(3)


def test_cache_matches_transformers_recurrent_state(qwen35_pair, tokens):
    hf, model = qwen35_pair
    with torch.no_grad():
        out = hf(tokens, use_cache=True)
        cache = model.empty_cache()
        model(tokens, cache=cache)
    ref = out.cache.get_recurrent_state(LAYER) if hasattr(out, "cache") else out.past_key_values.get_recurrent_state(LAYER)
    assert relative_error(cache.recurrent_state(LAYER), ref) <= 1e-4


def test_nested_hook_contexts(model, tokens):
    name = f"blocks.{LAYER}.mixer.hook_write_beta"
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    seen = []
    record = lambda x, hook: seen.append(float(x.abs().sum()))  # noqa: E731
    with torch.no_grad(), model.hooks(fwd_hooks=[(name, zero)]):
        outer = model(tokens)
        with model.hooks(fwd_hooks=[(name, record)]):
            model(tokens)
        assert model.hook_dict[name].has_hooks()
        assert torch.equal(model(tokens), outer)
    assert not model.hook_dict[name].has_hooks()
    assert seen == [0.0]  # the inner hook ran after the outer edit


def test_start_at_layer_continues_from_a_residual(model, tokens, full_cache):
    with torch.no_grad():
        resid = model(tokens, stop_at_layer=2)
        assert torch.equal(resid, full_cache["blocks.2.hook_resid_pre"])
        assert torch.equal(model(tokens, stop_at_layer=-2), resid)
        logits = model(resid, start_at_layer=2)
        loss = model(resid, start_at_layer=2, tokens=tokens, return_type="loss")
    assert torch.allclose(logits, model(tokens), atol=1e-6)
    assert torch.allclose(loss, model(tokens, return_type="loss"), atol=1e-6)
    with pytest.raises(ValueError, match="residual stream"):
        model(tokens, start_at_layer=2)


def test_fused_attention_equals_the_explicit_path(model, tokens):
    """Without hooks on the scores or the pattern, attention runs in the fused kernel; listening to the pattern
    switches to the explicit path: same logits, in one call and continuing from a cache."""
    pattern = "blocks.3.attn.hook_pattern"
    with torch.no_grad():
        fused = model(tokens)
        explicit, cache = model.run_with_cache(tokens, names_filter=pattern)
        assert torch.allclose(fused, explicit, atol=1e-5)
        assert cache[pattern].shape == (2, model.cfg.n_attn_heads, 70, 70)
        continued = {}
        for name, hooks in (("fused", []), ("explicit", [(pattern, lambda x, hook: x)])):
            kv = model.empty_cache()
            with model.hooks(fwd_hooks=hooks):
                model(tokens[:, :50], cache=kv)
                continued[name] = model(tokens[:, 50:], cache=kv)
        assert torch.allclose(continued["fused"], continued["explicit"], atol=1e-5)
        assert torch.allclose(continued["fused"], fused[:, 50:], atol=1e-4)


def test_rows_from_snapshots_share_keys_and_select_keeps_them_shared(model, tokens):
    """Rows made from cache snapshots read the passage's attention keys in place; continuing them equals continuing
    the full prefix, and ``select`` of some rows continues like those rows."""
    positions = [10, 37, 52]
    with torch.no_grad():
        cache = model.empty_cache()
        cache.request_snapshots(positions, range(model.cfg.n_layers))
        model(tokens[:1], cache=cache)
        rows = cache.rows_from_snapshots(torch.arange(len(positions)))
        assert rows.layers[3]["k"].shape[0] == 1 and rows.layers[3]["source"].tolist() == [0, 0, 0]
        step = torch.stack([tokens[0, s : s + 1] for s in positions])  # each row's next token
        continued = model(step, cache=rows.copy())
        full = model(tokens[:1])
        for r, s in enumerate(positions):
            assert torch.allclose(continued[r, 0], full[0, s], atol=1e-4)
        picked = model(step[[2, 0]], cache=rows.select([2, 0]))
        assert torch.allclose(picked, continued[[2, 0]], atol=1e-6)


def test_snapshots_per_batch_row_continue_like_each_rows_prefix(model, tokens):
    """With positions [batch, n_sel] every passage keeps its own snapshots; rows made from any passage's snapshots
    read that passage's attention keys and continue like its full run (GQA attention, d_k != d_v recurrent heads)."""
    per_row = torch.tensor([[10, 37, 37], [0, 52, 21]])  # row 0 pads by repeating a position
    with torch.no_grad():
        cache = model.empty_cache()
        cache.request_snapshots(per_row, range(1, model.cfg.n_layers))
        resid = model(tokens[:2], stop_at_layer=1)
        model(resid, start_at_layer=1, stop_at_layer=model.cfg.n_layers, cache=cache)
        which, rows = torch.tensor([2, 0, 1, 1, 2]), torch.tensor([1, 0, 1, 0, 0])
        made = cache.rows_from_snapshots(which, rows)
        assert made.layers[3]["k"].shape[0] == 2 and made.layers[3]["source"].tolist() == rows.tolist()
        one = cache.rows_from_snapshots(torch.tensor([0, 2]), torch.tensor([1, 1]))  # one passage: one source
        assert one.layers[3]["k"].shape[0] == 1 and one.layers[3]["source"].tolist() == [0, 0]
        assert torch.equal(one.layers[3]["k"][0], cache.layers[3]["k"][1, :, : one.seq_len])
        starts = per_row[rows, which]
        step = torch.stack([resid[r, s : s + 1] for r, s in zip(rows.tolist(), starts.tolist())])
        continued = model.unembed(model.ln_final(
            model(step, start_at_layer=1, stop_at_layer=model.cfg.n_layers, cache=made)))
        full = model(tokens[:2])
        for i, (r, s) in enumerate(zip(rows.tolist(), starts.tolist())):
            assert torch.allclose(continued[i, 0], full[r, s], atol=1e-4)
        # three tokens from the snapshots, the output kept at one of them per row (shared and own keys, masks)
        steps = torch.stack([resid[r, s : s + 3] for r, s in zip(rows.tolist(), starts.tolist())])
        keep = torch.tensor([[2], [0], [1], [2], [1]])
        kept = model.unembed(model.ln_final(model(steps, start_at_layer=1, stop_at_layer=model.cfg.n_layers,
                                                  cache=cache.rows_from_snapshots(which, rows), final_positions=keep)))
        for i, (r, s) in enumerate(zip(rows.tolist(), starts.tolist())):
            assert torch.allclose(kept[i, 0], full[r, s + keep[i, 0]], atol=1e-4)
    with pytest.raises(ValueError, match=r"\[n_sel\] or \[batch, n_sel\]"):
        model.empty_cache().request_snapshots(torch.zeros(1, 2, 3), [1])


@pytest.mark.parametrize("name", ["recurrent_only", "square_custom_layers"])
def test_final_positions_with_a_recurrent_last_layer(qwen35_folders, name):
    """A Gated DeltaNet last block computes its output only at the kept positions (the hook points after its mixer
    see those), equal to the full run there, with the same cache."""
    from writesae_lens.adapters.qwen35 import HookedQwen35

    model = HookedQwen35.from_pretrained(qwen35_folders[name]).eval()
    last = model.cfg.n_layers - 1
    assert not model.blocks[last].is_attention
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 70), generator=torch.Generator().manual_seed(1))
    positions = torch.tensor([[69, 0, 33], [64, 65, 5]])
    seen = []
    with torch.no_grad():
        full_cache, kept_cache = model.empty_cache(), model.empty_cache()
        full = model(tokens, cache=full_cache)
        kept = model.run_with_hooks(tokens, cache=kept_cache, final_positions=positions, fwd_hooks=[
            (f"blocks.{last}.hook_resid_mid", lambda x, hook: seen.append(x.shape))])
        assert seen == [(2, 3, model.cfg.d_model)]
        assert torch.allclose(kept, full[torch.arange(2)[:, None], positions], atol=1e-5)
        step = tokens[:, :1]
        assert torch.allclose(model(step, cache=kept_cache), model(step, cache=full_cache), atol=1e-6)


@pytest.mark.parametrize("name", ["square_custom_layers", "recurrent_only"])
def test_head_write_factors_on_other_layouts(qwen35_folders, name):
    """One value head's factors from its key head's and its own projection rows equal the write hooks, also with
    layer 0 recurrent and one key head shared by two value heads."""
    from writesae_lens.adapters.qwen35 import HookedQwen35

    model = HookedQwen35.from_pretrained(qwen35_folders[name]).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        for layer in model.cfg.recurrent_layers:
            x = model.blocks[layer].mixer_input(cache[f"blocks.{layer}.hook_resid_pre"])
            for head in range(model.cfg.n_heads):
                factors = model.blocks[layer].mixer.head_write_factors(x, head)
                for n in ("write_k", "write_v", "write_beta", "decay"):
                    hooked = cache[f"blocks.{layer}.mixer.hook_{n}"][:, :, head : head + 1]
                    assert torch.allclose(factors[n], hooked, atol=1e-6, rtol=1e-5), (layer, n, head)
