"""Every edit of the write interface against the naive token-by-token reference (non-square heads, GQA)."""

import pytest
import torch

from edit_checks import FACTORS, EditChecks, assert_close
from naive_recurrence import naive_edited_layer

LAYER = 1  # a recurrent layer of the "gqa_nonsquare" config (layers 0-2 recurrent, 3 attention)
_checks = EditChecks(LAYER, delta_rule=True)
mixer, run_edited, expected, check = _checks.mixer, _checks.run_edited, _checks.expected, _checks.check


@pytest.fixture(scope="module")
def setup(qwen35_pair):
    _, model = qwen35_pair
    tokens = torch.randint(0, 100, (2, 83), generator=torch.Generator().manual_seed(11))  # 83: not a chunk multiple
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[mixer(n) for n in FACTORS])
    native = {n: cache[mixer(n)] for n in FACTORS}
    return model, tokens, logits, native


CELLS = [(0, 5, 1), (0, 40, 3), (1, 64, 0), (1, 65, 2), (0, 82, 1)]  # (batch, pos, head), several per row


def test_native_run_matches_reference(setup):
    model, tokens, logits, native = setup
    ours = check(model, tokens, native, [])
    assert torch.allclose(ours, logits)


def test_write_value_and_beta_edits_replace_only_the_write(setup):
    model, tokens, logits, native = setup
    gen = torch.Generator().manual_seed(3)
    new_v, new_beta = native["hook_write_v"].clone(), native["hook_write_beta"].clone()
    for b, t, h in CELLS:
        new_v[b, t, h] = torch.randn(new_v.shape[-1], generator=gen)
        new_beta[b, t, h] = 0.0 if t % 2 else 2.5  # deletion (beta := 0) and an amplified write

    def set_v(x, hook):
        out = x.clone()
        for b, t, h in CELLS:
            out[b, t, h] = new_v[b, t, h]
        return out

    def set_beta(x, hook):  # in-place edit, returning None (the TransformerLens idiom)
        for b, t, h in CELLS:
            x[b, t, h] = new_beta[b, t, h]

    edited = check(model, tokens, native, [(mixer("hook_write_v"), set_v), (mixer("hook_write_beta"), set_beta)],
                   write_v=new_v, write_beta=new_beta)
    assert not torch.allclose(edited, logits)
    # nothing before the first edited position changes
    assert torch.allclose(edited[0, :5], logits[0, :5], atol=1e-6)


def test_write_key_edits_keep_the_native_transition(setup):
    model, tokens, logits, native = setup
    gen = torch.Generator().manual_seed(4)
    new_k = native["hook_write_k"].clone()
    for b, t, h in CELLS:
        new_k[b, t, h] = torch.nn.functional.normalize(torch.randn(new_k.shape[-1], generator=gen), dim=0)

    def set_k(x, hook):
        out = x.clone()
        for b, t, h in CELLS:
            out[b, t, h] = new_k[b, t, h]
        return out

    check(model, tokens, native, [(mixer("hook_write_k"), set_k)], write_k=new_k)


def test_atom_substitution_is_a_write_edit(setup):
    """Substituting c p q^T for the write (k := p, v := q, beta := c) at several positions at once."""
    model, tokens, _, native = setup
    gen = torch.Generator().manual_seed(5)
    d_k, d_v = native["hook_write_k"].shape[-1], native["hook_write_v"].shape[-1]
    p, q, c = torch.randn(d_k, generator=gen), torch.randn(d_v, generator=gen), 0.7
    new_k, new_v, new_b = (native[n].clone() for n in ("hook_write_k", "hook_write_v", "hook_write_beta"))
    for b, t, h in CELLS:
        new_k[b, t, h], new_v[b, t, h], new_b[b, t, h] = p, q, c
    hooks = [(mixer("hook_write_k"), lambda x, hook: new_k), (mixer("hook_write_v"), lambda x, hook: new_v),
             (mixer("hook_write_beta"), lambda x, hook: new_b)]
    check(model, tokens, native, hooks, write_k=new_k, write_v=new_v, write_beta=new_b)


def sparse_adds(cells, d_k, d_v, seed, batch=2, n_pos=83, n_heads=4):
    gen = torch.Generator().manual_seed(seed)
    matrices = {cell: torch.randn(d_k, d_v, generator=gen) * 0.5 for cell in cells}
    index = torch.tensor(list(matrices)).T
    sparse = torch.sparse_coo_tensor(index, torch.stack(list(matrices.values())), (batch, n_pos, n_heads, d_k, d_v))
    return matrices, sparse


def test_adding_a_matrix_to_the_write_and_after_the_read(setup):
    model, tokens, logits, native = setup
    d_k, d_v = native["hook_write_k"].shape[-1], native["hook_write_v"].shape[-1]
    before, before_sparse = sparse_adds(CELLS[:3], d_k, d_v, seed=6)
    after, after_sparse = sparse_adds(CELLS[2:], d_k, d_v, seed=7)  # one cell gets both timings
    hooks = [(mixer("hook_write_add"), lambda x, hook: x + before_sparse),
             (mixer("hook_post_read_add"), lambda x, hook: x + after_sparse)]
    check(model, tokens, native, hooks, adds_before=before, adds_after=after)


def test_post_read_edit_equals_editing_the_cache_between_decode_steps(setup):
    model, tokens, _, native = setup
    d_k, d_v = native["hook_write_k"].shape[-1], native["hook_write_v"].shape[-1]
    t = 40
    matrices, sparse = sparse_adds([(0, t, 1), (1, t, 3)], d_k, d_v, seed=8)
    with torch.no_grad():
        edited = model.run_with_hooks(tokens, fwd_hooks=[(mixer("hook_post_read_add"), lambda x, hook: x + sparse)])
        cache = model.empty_cache()
        prefix_logits = model(tokens[:, : t + 1], cache=cache)
        state = cache.layers[LAYER]["state"].clone()
        for (b, _, h), m in matrices.items():
            state[b, h] += m
        cache.layers[LAYER]["state"] = state
        rest_logits = model(tokens[:, t + 1 :], cache=cache)
    assert torch.allclose(torch.cat([prefix_logits, rest_logits], 1), edited, atol=2e-5)
    # the read at t is unchanged, so the output at t is too
    assert torch.allclose(edited[:, : t + 1], prefix_logits, atol=2e-5)


@pytest.mark.parametrize("in_place", [False, True])
def test_replacing_the_state_continues_the_recurrence(setup, in_place):
    model, tokens, _, native = setup
    d_k, d_v = native["hook_write_k"].shape[-1], native["hook_write_v"].shape[-1]
    gen = torch.Generator().manual_seed(9)
    sets = {cell: torch.randn(d_k, d_v, generator=gen) for cell in CELLS[1:4]}

    def replace(states, hook):
        out = states if in_place else states.clone()
        for (b, t, h), m in sets.items():
            out[b, t, h] = m.flatten()
        return None if in_place else out

    check(model, tokens, native, [(mixer("hook_state"), replace)], state_sets=sets)


def test_state_and_write_edits_compose(setup):
    model, tokens, _, native = setup
    d_k, d_v = native["hook_write_k"].shape[-1], native["hook_write_v"].shape[-1]
    before, before_sparse = sparse_adds(CELLS[:2], d_k, d_v, seed=10)
    gen = torch.Generator().manual_seed(12)
    sets = {(0, 5, 1): torch.randn(d_k, d_v, generator=gen), (1, 70, 2): torch.randn(d_k, d_v, generator=gen)}
    new_beta = native["hook_write_beta"].clone()
    new_beta[1, 66, 2] = 0.0

    def replace(states, hook):
        out = states.clone()
        for (b, t, h), m in sets.items():
            out[b, t, h] = m.flatten()
        return out

    hooks = [(mixer("hook_write_add"), lambda x, hook: x + before_sparse), (mixer("hook_state"), replace),
             (mixer("hook_write_beta"), lambda x, hook: new_beta)]
    check(model, tokens, native, hooks, adds_before=before, state_sets=sets, write_beta=new_beta)


def test_state_hook_sees_edited_states(setup):
    """hook_state shows the states the reads see: with a write edit, the trajectory equals the naive one."""
    model, tokens, _, native = setup
    new_beta = native["hook_write_beta"].clone()
    new_beta[0, 10, 2] = 0.0
    seen = {}

    def record(states, hook):
        seen["s"] = states.clone()

    hooks = [(mixer("hook_write_beta"), lambda x, hook: new_beta), (mixer("hook_state"), record)]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks)
    _, _, traj = naive_edited_layer(*(native[n] for n in FACTORS[:1]), native["hook_write_k"], native["hook_write_v"],
                                    native["hook_write_beta"], native["hook_decay"], write_beta=new_beta)
    b, p, h, d_k, d_v = traj.shape
    assert_close(seen["s"], traj.reshape(b, p, h, d_k * d_v))


def test_splicing_every_state_reads_from_those_states(setup):
    """Replacing all states with given matrices makes every read S'^T q (what SAELens' evals do)."""
    model, tokens, _, native = setup
    q = native["hook_read_q"]
    gen = torch.Generator().manual_seed(13)
    b, p, h, d_k = q.shape
    d_v = native["hook_write_v"].shape[-1]
    new_states = torch.randn(b, p, h, d_k, d_v, generator=gen)
    hooks = [(mixer("hook_state"), lambda x, hook: new_states.reshape(b, p, h, -1))]
    _, reads, _ = run_edited(model, tokens, hooks)
    assert_close(reads, torch.einsum("bphkv,bphk->bphv", new_states, q))


def test_decay_edit_changes_the_transition(setup):
    model, tokens, _, native = setup
    new_g = native["hook_decay"].clone()
    new_g[:, 30:35] = -5.0

    def naive_with_decay():
        return naive_edited_layer(native["hook_read_q"], native["hook_write_k"], native["hook_write_v"],
                                  native["hook_write_beta"], new_g)

    logits, reads, final = run_edited(model, tokens, [(mixer("hook_decay"), lambda x, hook: new_g)])
    ref_reads, ref_final, _ = naive_with_decay()
    assert_close(reads, ref_reads)
    assert_close(final, ref_final)


def test_edits_stay_active_during_generation(setup):
    model, _, _, _ = setup
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


def test_in_place_state_edit_under_inference_mode(setup):
    """Inference tensors keep no version counter: the edit must still be seen (``generate`` runs in this mode)."""
    model, tokens, _, native = setup
    d_k, d_v = native["hook_write_k"].shape[-1], native["hook_write_v"].shape[-1]
    gen = torch.Generator().manual_seed(19)
    sets = {cell: torch.randn(d_k, d_v, generator=gen) for cell in CELLS[:2]}

    def replace_in_place(states, hook):
        for (b, t, h), m in sets.items():
            states[b, t, h] = m.flatten()

    with torch.inference_mode():
        _, reads, final = run_edited(model, tokens, [(mixer("hook_state"), replace_in_place)])
    ref_reads, ref_final, _ = naive_edited_layer(*(native[n] for n in FACTORS), state_sets=sets)
    assert_close(reads, ref_reads)
    assert_close(final, ref_final)
