"""The DPLR recurrence ops (RWKV-7): chunked == token-by-token reference == the plain float64 loop == fla's
pure-torch ``dplr_recurrence`` (loaded from its file; skipped when the file is absent); edits propagated by
``propagate_dplr_edits`` == the naive edited loop."""

import pytest
import torch

from edit_checks import state_edits
from rwkv7_naive import load_fla_dplr_naive, naive_rwkv7_layer, rwkv7_factors
from writesae_lens.ops.dplr import dplr_chunked, dplr_recurrence, dplr_reference, propagate_dplr_edits
from writesae_lens.ops.state_edits import StateEdits

GRID = [  # (batch, pos, heads, d_k, d_v, chunk)
    pytest.param(2, 32, 2, 8, 12, 16, id="exact-chunks"),
    pytest.param(1, 37, 2, 12, 8, 16, id="ragged-tail"),
    pytest.param(2, 5, 1, 4, 6, 16, id="shorter-than-chunk"),
    pytest.param(1, 70, 2, 16, 16, 32, id="chunk-32"),
]


def close(a, b, tol=2e-5):
    b = b.to(a.dtype)
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    assert err <= tol, f"relative error {err:.2e}"


@pytest.mark.parametrize("batch,n_pos,n_heads,d_k,d_v,chunk", GRID)
@pytest.mark.parametrize("with_initial", [True, False], ids=["s0", "zero-s0"])
def test_chunked_equals_reference(batch, n_pos, n_heads, d_k, d_v, chunk, with_initial):
    r, k, v, w, ea, eb, s0 = rwkv7_factors(batch, n_pos, n_heads, d_k, d_v, seed=n_pos)
    s0 = s0 if with_initial else None
    ref = dplr_reference(r, k, v, w, ea, eb, s0, return_trajectory=True)
    fast = dplr_chunked(r, k, v, w, ea, eb, s0, return_trajectory=True, chunk_size=chunk)
    for a, b in zip(fast, ref):
        close(a, b)
    assert torch.allclose(ref[2][:, -1], ref[1])  # the trajectory ends in the final state


def test_reference_matches_plain_float64_loop():
    """S_t = (diag(exp(w_t)) - ea_t eb_t^T) S_{t-1} + k_t v_t^T with explicit matrices, read S_t^T r_t."""
    r, k, v, w, ea, eb, s0 = rwkv7_factors(2, 20, 2, 6, 7, seed=2)
    reads, final, traj = naive_rwkv7_layer(r, k, v, w, ea, eb, initial_state=s0)
    ours = dplr_reference(r, k, v, w, ea, eb, s0, return_trajectory=True)
    close(ours[0], reads, 1e-5)
    close(ours[1], final, 1e-5)
    close(ours[2], traj, 1e-5)


def test_strong_decay_and_edited_decays_stay_finite():
    """Decays far below RWKV-7's floor (and positive ones, as a hook edit may set) do not overflow the chunked path."""
    r, k, v, w, ea, eb, s0 = rwkv7_factors(1, 50, 2, 8, 8, seed=3)
    w = w * 20.0
    w[:, 10:12] = 0.05
    fast = dplr_chunked(r, k, v, w, ea, eb, s0, return_trajectory=True)
    ref = dplr_reference(r, k, v, w, ea, eb, s0, return_trajectory=True)
    assert all(torch.isfinite(t).all() for t in fast)
    for a, b in zip(fast, ref):
        close(a, b)


@pytest.mark.parametrize("chunk", [16, 64])
def test_factored_and_pairwise_decays_agree(monkeypatch, chunk):
    """The factored pair products (the fast path, taken when every chunk's cumulative log decay is within
    FACTORED_LOG_RANGE) and the explicit pairwise exponents (the fallback) give the reference's numbers, values and
    gradients; a range of 0 forces the fallback."""
    import writesae_lens.ops.dplr as dplr

    r, k, v, w, ea, eb, s0 = rwkv7_factors(2, 70, 2, 12, 8, seed=5)
    w = w.clamp_min(-0.6065)  # RWKV-7's own floor: the chunk's cumulative decay is at least -0.61 * chunk

    def run():
        inputs = [x.clone().requires_grad_() for x in (r, k, v, w, ea, eb, s0)]
        reads, final, traj = dplr_chunked(*inputs, return_trajectory=True, chunk_size=chunk)
        (reads.square().sum() + final.square().sum()).backward()
        return [reads.detach(), final.detach(), traj.detach()] + [x.grad for x in inputs]

    factored = run()
    monkeypatch.setattr(dplr, "FACTORED_LOG_RANGE", 0.0)
    pairwise = run()
    monkeypatch.undo()
    ref = dplr_reference(r, k, v, w, ea, eb, s0, return_trajectory=True)
    for a, b in zip(factored[:3], ref):
        close(a, b)
    for a, b in zip(factored, pairwise):
        close(a, b, 1e-5)


@pytest.mark.parametrize("chunk", [8, 16])
def test_states_at_selected_positions(chunk):
    r, k, v, w, ea, eb, s0 = rwkv7_factors(2, 45, 3, 5, 7, seed=9)
    positions = torch.tensor([0, 7, 8, 30, 44, 8])
    _, _, traj = dplr_reference(r, k, v, w, ea, eb, s0, return_trajectory=True)
    _, _, picked = dplr_chunked(r, k, v, w, ea, eb, s0, chunk_size=chunk, state_positions=positions)
    _, _, picked_ref = dplr_reference(r, k, v, w, ea, eb, s0, state_positions=positions)
    assert picked.shape == (2, 6, 3, 5, 7)
    close(picked, traj[:, positions])
    assert torch.equal(picked_ref, traj[:, positions])
    per_row = torch.tensor([[0, 7, 30], [44, 8, 1]])  # each batch row its own positions
    _, _, picked = dplr_chunked(r, k, v, w, ea, eb, s0, chunk_size=chunk, state_positions=per_row)
    for row in range(2):
        close(picked[row], traj[row, per_row[row]])


def test_dispatch_agrees_with_reference_for_decoding_lengths():
    r, k, v, w, ea, eb, s0 = rwkv7_factors(1, 3, 2, 4, 4, seed=4)
    for a, b in zip(dplr_recurrence(r, k, v, w, ea, eb, s0), dplr_reference(r, k, v, w, ea, eb, s0)):
        if a is not None:
            assert torch.equal(a, b)


def test_matches_fla_naive_dplr_recurrence():
    """fla 0.6.0's ``dplr_recurrence(q, k, v, alpha, beta, gk)`` as the oracle, with RWKV-7's mapping
    alpha = -kk, beta = kk * a, gk = w. That reference always scales q by d_k^-1/2 (RWKV-7's kernels are called with
    scale 1), so our query is r * d_k^-1/2. It takes [batch, head, pos, d] tensors."""
    fla, reason = load_fla_dplr_naive()
    if fla is None:
        pytest.skip(reason)
    batch, n_pos, n_heads, d_k, d_v = 2, 40, 3, 16, 12
    r, k, v, w, ea, eb, s0 = rwkv7_factors(batch, n_pos, n_heads, d_k, d_v, seed=5)
    to_bhtd = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    fla_out, fla_state = fla.dplr_recurrence(*(to_bhtd(x) for x in (r, k, v, -eb, ea, w)), initial_state=s0.clone(),
                                             output_final_state=True)
    fla_out = fla_out.transpose(1, 2)
    scaled = r * d_k**-0.5
    for ours in (dplr_reference(scaled, k, v, w, ea, eb, s0), dplr_chunked(scaled, k, v, w, ea, eb, s0)):
        close(ours[0], fla_out, 1e-5)
        close(ours[1], fla_state, 1e-5)
    # fla's chunkwise reference too (it needs a length that is a multiple of its chunk size)
    chunk_out, chunk_state = fla.dplr_chunkwise(*(to_bhtd(x[:, :32]) for x in (r, k, v, -eb, ea, w)),
                                                initial_state=s0.clone(), chunk_size=16)
    ours = dplr_chunked(scaled[:, :32], k[:, :32], v[:, :32], w[:, :32], ea[:, :32], eb[:, :32], s0)
    close(ours[0], chunk_out.transpose(1, 2), 1e-5)
    close(ours[1], chunk_state, 1e-5)


def test_propagated_edits_equal_naive_edited_run():
    r, k, v, w, ea, eb, _ = rwkv7_factors(3, 50, 2, 6, 9, seed=7)
    gen = torch.Generator().manual_seed(8)
    mats = lambda cells: {c: torch.randn(6, 9, generator=gen) for c in cells}  # noqa: E731
    before = mats([(0, 3, 1), (2, 30, 0), (0, 33, 0)])
    after = mats([(1, 10, 1), (0, 33, 0), (2, 49, 1)])
    sets = mats([(1, 20, 0)])
    base_reads, base_final, base_traj = dplr_reference(r, k, v, w, ea, eb, return_trajectory=True)


    set_corrections = {c: m - base_traj[c] for c, m in sets.items()}
    all_edits = StateEdits.concat(state_edits(before), state_edits(after, after_read=True),
                                  state_edits(set_corrections, assign=True))
    read_delta, final_delta, traj_delta = propagate_dplr_edits(r, w, ea, eb, all_edits, return_trajectory=True)
    ref_reads, ref_final, ref_traj = naive_rwkv7_layer(r, k, v, w, ea, eb, adds_before=before, adds_after=after,
                                                       state_sets=sets)
    close(base_reads + read_delta, ref_reads, 1e-5)
    close(base_final + final_delta, ref_final, 1e-5)
    close(base_traj + traj_delta, ref_traj, 1e-5)

    only_row_one = state_edits({(1, 10, 1): after[(1, 10, 1)]}, after_read=True)
    read_delta, _, _ = propagate_dplr_edits(r, w, ea, eb, only_row_one)
    assert torch.count_nonzero(read_delta[[0, 2]]) == 0
    assert torch.count_nonzero(read_delta[1, :11]) == 0  # after the read at 10: position 10 is unchanged
    assert torch.count_nonzero(read_delta[1, 11:]) > 0


@pytest.mark.parametrize("trajectory", [False, True], ids=["reads", "trajectory"])
def test_gradients_through_the_chunked_op_equal_the_reference(trajectory):
    """Every input, decay and erase factors included, gets the step reference's gradient (attribution works)."""
    factors = rwkv7_factors(1, 37, 2, 6, 9, seed=5)
    weights = torch.randn(1, 37, 2, 9 if not trajectory else 6, generator=torch.Generator().manual_seed(6))

    def grads(op, **options):
        inputs = [f.clone().requires_grad_() for f in factors]
        reads, final, traj = op(*inputs, return_trajectory=trajectory, **options)
        loss = (traj.sum(-1) * weights).sum() if trajectory else (reads * weights).sum() + final.square().sum()
        loss.backward()
        return [x.grad for x in inputs]

    for fast, ref in zip(grads(dplr_chunked, chunk_size=16), grads(dplr_reference)):
        if ref is None:  # an input the output does not depend on (the query, for the trajectory)
            assert fast is None or not fast.any()
        else:
            close(fast, ref, tol=1e-4)
