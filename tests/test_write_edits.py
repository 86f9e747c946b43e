"""Every edit of the write interface on the models, against the naive token-by-token reference: the Qwen3.5 hybrid
(Gated DeltaNet, delta rule; GQA, d_k 8 != d_v 12) and Mamba-2 (no erase term; d_state 8, head_dim 12, 4 heads per
group of B and C). RWKV-7's DPLR mixer has the same checks at the mixer level (``test_rwkv7_mixer.py``). 83 positions:
not a multiple of the chunk size."""

import pytest
import torch

from edit_checks import FACTORS, EditChecks, assert_close

LAYER = 1  # recurrent in both configurations
N_POS = 83
CELLS = [(0, 5, 1), (0, 40, 3), (1, 64, 0), (1, 65, 2), (0, 82, 1)]  # (batch, pos, head), several per row


@pytest.fixture(scope="module", params=["qwen35", "mamba2"])
def setup(request, qwen35_pair, mamba2_pair):
    """(model, tokens, native logits, native write factors of layer LAYER, the family's EditChecks)."""
    model = {"qwen35": qwen35_pair, "mamba2": mamba2_pair}[request.param][1]
    checks = EditChecks(LAYER, delta_rule=request.param == "qwen35")
    tokens = torch.randint(0, 100, (2, N_POS), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[checks.mixer(n) for n in FACTORS])
    native = {n: cache[checks.mixer(n)] for n in FACTORS}
    return model, tokens, logits, native, checks


def test_native_run_matches_reference(setup):
    model, tokens, logits, native, checks = setup
    ours = checks.check(model, tokens, native, [])
    assert torch.allclose(ours, logits)


@pytest.mark.parametrize("in_place", [False, True])
def test_write_value_and_beta_edits_replace_only_the_write(setup, in_place):
    """beta := 0 deletes the write, beta := 2.5 amplifies it; the transition keeps the model's own factors."""
    model, tokens, logits, native, checks = setup
    gen = torch.Generator().manual_seed(3)
    new_v, new_beta = native["hook_write_v"].clone(), native["hook_write_beta"].clone()
    for b, t, h in CELLS:
        new_v[b, t, h] = torch.randn(new_v.shape[-1], generator=gen)
        new_beta[b, t, h] = 0.0 if t % 2 else 2.5  # deletion (beta := 0) and an amplified write

    def set_v(x, hook):
        out = x if in_place else x.clone()
        for b, t, h in CELLS:
            out[b, t, h] = new_v[b, t, h]
        return out

    def set_beta(x, hook):  # in-place edit, returning None (the TransformerLens idiom)
        for b, t, h in CELLS:
            x[b, t, h] = new_beta[b, t, h]

    hooks = [(checks.mixer("hook_write_v"), set_v), (checks.mixer("hook_write_beta"), set_beta)]
    edited = checks.check(model, tokens, native, hooks, write_v=new_v, write_beta=new_beta)
    assert not torch.allclose(edited, logits)
    assert torch.allclose(edited[0, :5], logits[0, :5], atol=1e-6)  # nothing before the first edited position changes
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(tokens, names_filter=[checks.mixer("hook_decay")])
    assert torch.equal(cache[checks.mixer("hook_decay")], native["hook_decay"])


@pytest.mark.parametrize("unit_norm", [True, False])
def test_write_key_edits_keep_the_native_transition(setup, unit_norm):
    model, tokens, _, native, checks = setup
    gen = torch.Generator().manual_seed(4)
    new_k = native["hook_write_k"].clone()
    for b, t, h in CELLS:
        key = torch.randn(new_k.shape[-1], generator=gen)
        new_k[b, t, h] = torch.nn.functional.normalize(key, dim=0) if unit_norm else key

    def set_k(x, hook):
        out = x.clone()
        for b, t, h in CELLS:
            out[b, t, h] = new_k[b, t, h]
        return out

    checks.check(model, tokens, native, [(checks.mixer("hook_write_k"), set_k)], write_k=new_k)


def test_atom_substitution_is_a_write_edit(setup):
    """Substituting c p q^T for the write (k := p, v := q, beta := c) at several positions at once."""
    model, tokens, _, native, checks = setup
    gen = torch.Generator().manual_seed(5)
    d_k, d_v = native["hook_write_k"].shape[-1], native["hook_write_v"].shape[-1]
    p, q, c = torch.randn(d_k, generator=gen), torch.randn(d_v, generator=gen), 0.7
    new_k, new_v, new_b = (native[n].clone() for n in ("hook_write_k", "hook_write_v", "hook_write_beta"))
    for b, t, h in CELLS:
        new_k[b, t, h], new_v[b, t, h], new_b[b, t, h] = p, q, c
    hooks = [(checks.mixer("hook_write_k"), lambda x, hook: new_k), (checks.mixer("hook_write_v"), lambda x, hook: new_v),
             (checks.mixer("hook_write_beta"), lambda x, hook: new_b)]
    checks.check(model, tokens, native, hooks, write_k=new_k, write_v=new_v, write_beta=new_b)


def sparse_adds(model, cells, seed, batch=2):
    """Random matrices at ``cells`` ({cell: [d_k, d_v]}) and the same as one sparse [batch, pos, head, d_k, d_v]."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    matrices = {cell: torch.randn(cfg.d_k, cfg.d_v, generator=gen) * 0.5 for cell in cells}
    index = torch.tensor(list(matrices)).T
    sparse = torch.sparse_coo_tensor(index, torch.stack(list(matrices.values())),
                                     (batch, N_POS, cfg.n_heads, cfg.d_k, cfg.d_v), check_invariants=True)
    return matrices, sparse


def test_adding_a_matrix_to_the_write_and_after_the_read(setup):
    model, tokens, _, native, checks = setup
    before, before_sparse = sparse_adds(model, CELLS[:3], seed=6)
    after, after_sparse = sparse_adds(model, CELLS[2:], seed=7)  # one cell gets both timings
    hooks = [(checks.mixer("hook_write_add"), lambda x, hook: x + before_sparse),
             (checks.mixer("hook_post_read_add"), lambda x, hook: x + after_sparse)]
    checks.check(model, tokens, native, hooks, adds_before=before, adds_after=after)


def test_post_read_edit_equals_editing_the_cache_between_decode_steps(setup):
    model, tokens, _, _, checks = setup
    t = 40
    matrices, sparse = sparse_adds(model, [(0, t, 1), (1, t, 3)], seed=8)
    with torch.no_grad():
        edited = model.run_with_hooks(tokens, fwd_hooks=[(checks.mixer("hook_post_read_add"),
                                                          lambda x, hook: x + sparse)])
        cache = model.empty_cache()
        prefix_logits = model(tokens[:, : t + 1], cache=cache)
        state = cache.layers[LAYER]["state"].clone()  # [batch, head, d_k, d_v]
        for (b, _, h), m in matrices.items():
            state[b, h] += m
        cache.layers[LAYER]["state"] = state
        step_logits = model(tokens[:, t + 1 : t + 2], cache=cache)  # one decoding step
        rest_logits = model(tokens[:, t + 2 :], cache=cache)
    assert torch.allclose(torch.cat([prefix_logits, step_logits, rest_logits], 1), edited, atol=2e-5)
    assert torch.allclose(edited[:, : t + 1], prefix_logits, atol=2e-5)  # the read at t is unchanged


def state_replacer(sets: dict, in_place: bool = False):
    """A hook_state hook that writes the matrices of ``sets`` ({cell: [d_k, d_v]}) into the states."""

    def replace(states, hook):
        out = states if in_place else states.clone()
        for (b, t, h), m in sets.items():
            out[b, t, h] = m.flatten()
        return None if in_place else out

    return replace


@pytest.mark.parametrize("in_place", [False, True])
def test_replacing_the_state_continues_the_recurrence(setup, in_place):
    model, tokens, _, native, checks = setup
    gen = torch.Generator().manual_seed(9)
    sets = {cell: torch.randn(model.cfg.d_k, model.cfg.d_v, generator=gen) for cell in CELLS[1:4]}
    checks.check(model, tokens, native, [(checks.mixer("hook_state"), state_replacer(sets, in_place))],
                 state_sets=sets)


def test_in_place_state_edit_under_inference_mode(setup):
    """An in-place edit must be seen under inference_mode too (``generate`` runs in this mode)."""
    model, tokens, _, native, checks = setup
    gen = torch.Generator().manual_seed(19)
    sets = {cell: torch.randn(model.cfg.d_k, model.cfg.d_v, generator=gen) for cell in CELLS[:2]}
    with torch.inference_mode():
        _, reads, final = checks.run_edited(model, tokens, [(checks.mixer("hook_state"), state_replacer(sets, True))])
    ref_reads, ref_final, _ = checks.naive(native, state_sets=sets)
    assert_close(reads, ref_reads)
    assert_close(final, ref_final)


def test_state_and_write_edits_compose(setup):
    model, tokens, _, native, checks = setup
    before, before_sparse = sparse_adds(model, CELLS[:2], seed=10)
    gen = torch.Generator().manual_seed(12)
    sets = {cell: torch.randn(model.cfg.d_k, model.cfg.d_v, generator=gen) for cell in [(0, 5, 1), (1, 70, 2)]}
    new_beta = native["hook_write_beta"].clone()
    new_beta[1, 66, 2] = 0.0
    hooks = [(checks.mixer("hook_write_add"), lambda x, hook: x + before_sparse),
             (checks.mixer("hook_state"), state_replacer(sets)),
             (checks.mixer("hook_write_beta"), lambda x, hook: new_beta)]
    checks.check(model, tokens, native, hooks, adds_before=before, state_sets=sets, write_beta=new_beta)


def test_state_hook_sees_edited_states(setup):
    """hook_state shows the states the reads see: with a write edit, the trajectory equals the naive one."""
    model, tokens, _, native, checks = setup
    new_beta = native["hook_write_beta"].clone()
    new_beta[0, 10, 2] = 0.0
    seen = {}
    hooks = [(checks.mixer("hook_write_beta"), lambda x, hook: new_beta),
             (checks.mixer("hook_state"), lambda states, hook: seen.__setitem__("s", states.clone()))]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
    _, _, traj = checks.naive(native, write_beta=new_beta)
    b, p, h, d_k, d_v = traj.shape
    assert_close(seen["s"], traj.reshape(b, p, h, d_k * d_v))


def test_splicing_every_state_reads_from_those_states(setup):
    """Replacing all states with given matrices makes every read S'^T q (what SAELens' evals do)."""
    model, tokens, _, native, checks = setup
    q = native["hook_read_q"]
    gen = torch.Generator().manual_seed(13)
    b, p, h, d_k = q.shape
    new_states = torch.randn(b, p, h, d_k, model.cfg.d_v, generator=gen)
    hooks = [(checks.mixer("hook_state"), lambda x, hook: new_states.reshape(b, p, h, -1))]
    _, reads, _ = checks.run_edited(model, tokens, hooks)
    assert_close(reads, torch.einsum("bphkv,bphk->bphv", new_states, q))


def test_decay_edit_changes_the_transition(setup):
    model, tokens, _, native, checks = setup
    new_decay = native["hook_decay"].clone()
    new_decay[:, 30:35] = -5.0
    _, reads, final = checks.run_edited(model, tokens, [(checks.mixer("hook_decay"), lambda x, hook: new_decay)])
    ref_reads, ref_final, _ = checks.naive({**native, "hook_decay": new_decay})
    assert_close(reads, ref_reads)
    assert_close(final, ref_final)


def test_edits_stay_active_during_generation(setup):
    model = setup[0]
    prompt = torch.tensor([[4, 8, 15, 16, 23, 42]])
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    calls = []

    def kill_writes(beta, hook):
        calls.append(beta.shape[1])
        return torch.zeros_like(beta)

    with model.hooks(fwd_hooks=[(lambda n: n.endswith("mixer.hook_write_beta"), kill_writes)]):
        edited = model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
        # the same edit without a cache, for comparison: hooks see the whole sequence each step
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False,
                                  use_past_kv_cache=False)
    assert torch.equal(edited, uncached)
    assert not torch.equal(edited, plain)
    assert 1 in calls and 6 in calls  # the prompt once, then one position per decoding step
