"""Every edit of the write interface on the DPLR mixer (RWKV-7's transition) against the plain float64 loop of
``rwkv7_naive``; non-square heads (d_k 6, d_v 9), a length that is not a multiple of the chunk size, a random
initial state. The mixer runs inside a minimal HookedRootModule, so the hooks are named ``mixer.hook_*``."""

import pytest
import torch
from transformer_lens.HookedRootModule import HookedRootModule

from rwkv7_naive import naive_rwkv7_layer, rwkv7_factors
from writesae_lens.hooking.dplr_mixer import DPLRWriteMixer

BATCH, N_POS, N_HEADS, D_K, D_V = 2, 37, 3, 6, 9
CELLS = [(0, 2, 1), (0, 17, 2), (1, 16, 0), (1, 17, 1), (0, 36, 0)]  # (batch, pos, head), several per row
NAMES = ("read_q", "write_k", "write_v", "write_beta", "decay", "erase_a", "erase_b")


class OneMixer(HookedRootModule):
    """The DPLR mixer alone: forward(factors dict, layer_cache) -> reads."""

    def __init__(self) -> None:
        super().__init__()
        self.mixer = DPLRWriteMixer()
        self.setup()

    def forward(self, f: dict, layer_cache: dict | None = None):
        return self.mixer.recur_with_cache(*(f[n] for n in NAMES[:5]), layer_cache, erase_a=f["erase_a"],
                                           erase_b=f["erase_b"])


@pytest.fixture(scope="module")
def setup():
    r, k, v, w, ea, eb, s0 = rwkv7_factors(BATCH, N_POS, N_HEADS, D_K, D_V, seed=21)
    f = dict(read_q=r, write_k=k, write_v=v, write_beta=torch.ones(BATCH, N_POS, N_HEADS), decay=w, erase_a=ea,
             erase_b=eb)
    return OneMixer(), f, s0


def fresh(f):
    return {n: t.clone() for n, t in f.items()}  # hooks may edit in place


def run(model, f, s0, hooks=()):
    cache = {"state": s0.clone()}
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        reads = model(fresh(f), cache)
    return reads, cache["state"]


def naive(f, s0, **edits):
    return naive_rwkv7_layer(f["read_q"], f["write_k"], f["write_v"], f["decay"], f["erase_a"], f["erase_b"],
                             beta=f["write_beta"], initial_state=s0, **edits)


def close(ours, ref, tol=1e-5):
    ref = ref.to(ours.dtype)
    err = ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
    assert err <= tol, f"relative error {err:.2e}"


def check(model, f, s0, hooks, **edits):
    reads, final = run(model, f, s0, hooks)
    ref_reads, ref_final, _ = naive(f, s0, **edits)
    close(reads, ref_reads)
    close(final, ref_final)
    return reads


def mixer(name):
    return f"mixer.hook_{name}"


def test_hook_names_and_native_run(setup):
    model, f, s0 = setup
    expected = {mixer(n) for n in ("write_k", "write_v", "write_beta", "decay", "erase_a", "erase_b", "read_q",
                                   "write_add", "state", "post_read_add", "read")}
    assert expected <= set(model.hook_dict)
    check(model, f, s0, [])
    with torch.no_grad():
        dense = [mixer(n) for n in NAMES + ("state", "read")]  # the sparse edit hooks carry no activation
        _, cache = model.run_with_cache(fresh(f), {"state": s0.clone()}, names_filter=dense)
    for n in NAMES:
        assert torch.equal(cache[mixer(n)], f[n])
    _, _, traj = naive(f, s0)
    close(cache[mixer("state")], traj.reshape(BATCH, N_POS, N_HEADS, D_K * D_V))  # the hook_state identity


def test_write_value_and_beta_edits_replace_only_the_write(setup):
    """beta := 0 deletes the write k v^T but keeps the decay and the erase; in-place hooks returning None too."""
    model, f, s0 = setup
    gen = torch.Generator().manual_seed(3)
    new_v, new_beta = f["write_v"].clone(), f["write_beta"].clone()
    for b, t, h in CELLS:
        new_v[b, t, h] = torch.randn(D_V, generator=gen)
        new_beta[b, t, h] = 0.0 if t % 2 else 2.5

    def set_v(x, hook):
        for b, t, h in CELLS:
            x[b, t, h] = new_v[b, t, h]
        return x

    def set_beta(x, hook):
        for b, t, h in CELLS:
            x[b, t, h] = new_beta[b, t, h]

    hooks = [(mixer("write_v"), set_v), (mixer("write_beta"), set_beta)]
    edited = check(model, f, s0, hooks, write_v=new_v, write_beta=new_beta)
    native, _ = run(model, f, s0)
    assert not torch.allclose(edited, native)
    assert torch.equal(edited[0, :2], native[0, :2])  # nothing before the first edited position changes


def test_write_key_edits(setup):
    model, f, s0 = setup
    gen = torch.Generator().manual_seed(4)
    new_k = f["write_k"].clone()
    for b, t, h in CELLS:
        new_k[b, t, h] = torch.randn(D_K, generator=gen)
    check(model, f, s0, [(mixer("write_k"), lambda x, hook: new_k)], write_k=new_k)


def test_atom_substitution_is_a_write_edit(setup):
    model, f, s0 = setup
    gen = torch.Generator().manual_seed(5)
    p, q, c = torch.randn(D_K, generator=gen), torch.randn(D_V, generator=gen), 0.7
    new_k, new_v, new_b = (f[n].clone() for n in ("write_k", "write_v", "write_beta"))
    for b, t, h in CELLS:
        new_k[b, t, h], new_v[b, t, h], new_b[b, t, h] = p, q, c
    hooks = [(mixer("write_k"), lambda x, hook: new_k), (mixer("write_v"), lambda x, hook: new_v),
             (mixer("write_beta"), lambda x, hook: new_b)]
    check(model, f, s0, hooks, write_k=new_k, write_v=new_v, write_beta=new_b)


def sparse_adds(cells, seed):
    gen = torch.Generator().manual_seed(seed)
    matrices = {cell: torch.randn(D_K, D_V, generator=gen) * 0.5 for cell in cells}
    index = torch.tensor(list(matrices)).T
    sparse = torch.sparse_coo_tensor(index, torch.stack(list(matrices.values())), (BATCH, N_POS, N_HEADS, D_K, D_V),
                                     check_invariants=True)
    return matrices, sparse


def test_adding_a_matrix_to_the_write_and_after_the_read(setup):
    model, f, s0 = setup
    before, before_sparse = sparse_adds(CELLS[:3], seed=6)
    after, after_sparse = sparse_adds(CELLS[2:], seed=7)  # one cell gets both timings
    hooks = [(mixer("write_add"), lambda x, hook: x + before_sparse),
             (mixer("post_read_add"), lambda x, hook: x + after_sparse)]
    check(model, f, s0, hooks, adds_before=before, adds_after=after)


def test_post_read_edit_equals_editing_the_cache_between_decode_steps(setup):
    model, f, s0 = setup
    t = 17
    matrices, sparse = sparse_adds([(0, t, 1), (1, t, 2)], seed=8)
    edited, edited_final = run(model, f, s0, [(mixer("post_read_add"), lambda x, hook: x + sparse)])
    cache = {"state": s0.clone()}
    piece = lambda a, b: {n: x[:, a:b].clone() for n, x in f.items()}  # noqa: E731
    with torch.no_grad():
        prefix = model(piece(0, t + 1), cache)
        state = cache["state"].clone()
        for (b, _, h), m in matrices.items():
            state[b, h] += m
        cache["state"] = state
        step = model(piece(t + 1, t + 2), cache)  # one decoding step (the token-by-token path)
        rest = model(piece(t + 2, N_POS), cache)  # the chunked path
    close(torch.cat([prefix, step, rest], 1), edited)
    close(cache["state"], edited_final)
    native, _ = run(model, f, s0)
    assert torch.equal(edited[:, : t + 1], native[:, : t + 1])  # the read at t is unchanged


@pytest.mark.parametrize("in_place", [False, True])
def test_replacing_the_state_continues_the_recurrence(setup, in_place):
    model, f, s0 = setup
    gen = torch.Generator().manual_seed(9)
    sets = {cell: torch.randn(D_K, D_V, generator=gen) for cell in CELLS[1:4]}

    def replace(states, hook):
        out = states if in_place else states.clone()
        for (b, t, h), m in sets.items():
            out[b, t, h] = m.flatten()
        return None if in_place else out

    check(model, f, s0, [(mixer("state"), replace)], state_sets=sets)


def test_state_edit_under_inference_mode(setup):
    """``generate`` runs under inference mode, where tensors have no version counter: an in-place edit of the
    states must still be seen (and not be compared against the overwritten trajectory)."""
    model, f, s0 = setup
    sets = {(1, 20, 1): torch.randn(D_K, D_V, generator=torch.Generator().manual_seed(13))}

    def replace(states, hook):
        states[1, 20, 1] = sets[(1, 20, 1)].flatten()

    cache = {"state": s0.clone()}
    with torch.inference_mode(), model.hooks(fwd_hooks=[(mixer("state"), replace)]):
        reads = model(fresh(f), cache)
    ref_reads, ref_final, _ = naive(f, s0, state_sets=sets)
    close(reads, ref_reads)
    close(cache["state"], ref_final)


def test_state_and_write_edits_compose(setup):
    model, f, s0 = setup
    before, before_sparse = sparse_adds(CELLS[:2], seed=10)
    gen = torch.Generator().manual_seed(12)
    sets = {(0, 2, 1): torch.randn(D_K, D_V, generator=gen), (1, 30, 2): torch.randn(D_K, D_V, generator=gen)}
    new_beta = f["write_beta"].clone()
    new_beta[1, 25, 2] = 0.0

    def replace(states, hook):
        out = states.clone()
        for (b, t, h), m in sets.items():
            out[b, t, h] = m.flatten()
        return out

    hooks = [(mixer("write_add"), lambda x, hook: x + before_sparse), (mixer("state"), replace),
             (mixer("write_beta"), lambda x, hook: new_beta)]
    check(model, f, s0, hooks, adds_before=before, state_sets=sets, write_beta=new_beta)


def test_state_hook_sees_edited_states(setup):
    model, f, s0 = setup
    new_beta = f["write_beta"].clone()
    new_beta[0, 10, 2] = 0.0
    seen = {}
    hooks = [(mixer("write_beta"), lambda x, hook: new_beta),
             (mixer("state"), lambda states, hook: seen.__setitem__("s", states.clone()))]
    run(model, f, s0, hooks)
    _, _, traj = naive(f, s0, write_beta=new_beta)
    close(seen["s"], traj.reshape(BATCH, N_POS, N_HEADS, D_K * D_V))


@pytest.mark.parametrize("factor", ["decay", "erase_a", "erase_b"])
def test_transition_edits_change_the_transition(setup, factor):
    model, f, s0 = setup
    new = f[factor].clone()
    new[:, 10:14] = -3.0 if factor == "decay" else 0.4
    reads, final = run(model, f, s0, [(mixer(factor), lambda x, hook: new)])
    ref_reads, ref_final, _ = naive({**f, factor: new}, s0)
    close(reads, ref_reads)
    close(final, ref_final)


def test_read_query_and_read_edits(setup):
    model, f, s0 = setup
    new_q = f["read_q"].clone()
    new_q[1, 5:9] = 1.0
    reads, final = run(model, f, s0, [(mixer("read_q"), lambda x, hook: new_q)])
    ref_reads, ref_final, _ = naive({**f, "read_q": new_q}, s0)
    close(reads, ref_reads)
    close(final, ref_final)
    reads, _ = run(model, f, s0, [(mixer("read"), lambda x, hook: x * 0 + 1)])
    assert torch.equal(reads, torch.ones_like(reads))


def test_cache_snapshots(setup):
    model, f, s0 = setup
    positions = torch.tensor([0, 5, 16, 36])
    cache = {"state": s0.clone(), "snapshot_at": positions}
    with torch.no_grad():
        model(fresh(f), cache)
    _, _, traj = naive(f, s0)
    expected = torch.cat([s0[:, None].double(), traj[:, positions[1:] - 1]], dim=1)
    close(cache["snapshots"]["state"], expected)
    cache = {"state": s0.clone(), "snapshot_at": positions}
    _, one_add = sparse_adds([(0, 3, 1)], seed=14)
    with torch.no_grad(), model.hooks(fwd_hooks=[(mixer("write_add"), lambda x, hook: x + one_add)]):
        with pytest.raises(ValueError, match="unedited pass"):
            model(fresh(f), cache)


def test_bad_hook_outputs_raise(setup):
    model, f, s0 = setup
    with pytest.raises(ValueError, match="keep the shape"):
        run(model, f, s0, [(mixer("decay"), lambda x, hook: x[..., 0])])
    with pytest.raises(ValueError, match="non-finite"):
        run(model, f, s0, [(mixer("erase_a"), lambda x, hook: x * float("nan"))])
    bad = torch.sparse_coo_tensor(torch.tensor([[0], [N_POS], [0]]), torch.zeros(1, D_K, D_V),
                                  (BATCH, N_POS + 1, N_HEADS, D_K, D_V), check_invariants=False)
    with pytest.raises(ValueError):
        run(model, f, s0, [(mixer("write_add"), lambda x, hook: bad)])
