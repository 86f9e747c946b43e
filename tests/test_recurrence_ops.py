"""The pure recurrence ops: chunked == token-by-token reference == transformers' reference kernels."""

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule

from edit_checks import state_edits
from naive_recurrence import naive_edited_layer
from writesae_lens.ops.gated_delta import recurrence_chunked, recurrence_reference
from writesae_lens.ops.state_edits import StateEdits, propagate_edits


def factors(batch, n_pos, n_heads, d_k, d_v, seed, strong_decay=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(batch, n_pos, n_heads, d_k, generator=gen), dim=-1) * d_k**-0.5
    k = torch.nn.functional.normalize(torch.randn(batch, n_pos, n_heads, d_k, generator=gen), dim=-1)
    v = torch.randn(batch, n_pos, n_heads, d_v, generator=gen)
    beta = torch.rand(batch, n_pos, n_heads, generator=gen)
    g = -torch.rand(batch, n_pos, n_heads, generator=gen) * (8.0 if strong_decay else 0.3)
    s0 = torch.randn(batch, n_heads, d_k, d_v, generator=gen)
    return q, k, v, beta, g, s0


GRID = [  # (batch, pos, heads, d_k, d_v, chunk)
    pytest.param(2, 64, 3, 8, 12, 16, id="exact-chunks"),
    pytest.param(1, 37, 2, 12, 8, 16, id="ragged-tail"),
    pytest.param(3, 5, 1, 4, 6, 64, id="shorter-than-chunk"),
    pytest.param(2, 130, 2, 16, 16, 64, id="default-chunk"),
]


@pytest.mark.parametrize("batch,n_pos,n_heads,d_k,d_v,chunk", GRID)
@pytest.mark.parametrize("delta_rule", [True, False], ids=["delta-rule", "no-erase"])
@pytest.mark.parametrize("with_initial", [True, False], ids=["s0", "zero-s0"])
def test_chunked_equals_reference(batch, n_pos, n_heads, d_k, d_v, chunk, delta_rule, with_initial):
    q, k, v, beta, g, s0 = factors(batch, n_pos, n_heads, d_k, d_v, seed=n_pos)
    u = beta[..., None] * v
    erase = beta if delta_rule else None
    s0 = s0 if with_initial else None
    ref = recurrence_reference(q, k, u, g, erase, s0, return_trajectory=True)
    fast = recurrence_chunked(q, k, u, g, erase, s0, return_trajectory=True, chunk_size=chunk)
    for a, b in zip(fast, ref):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4)
    assert torch.allclose(ref[2][:, -1], ref[1])  # the trajectory ends in the final state


def test_strong_decay_does_not_overflow():
    q, k, v, beta, g, s0 = factors(2, 200, 2, 8, 8, seed=1, strong_decay=True)
    fast = recurrence_chunked(q, k, beta[..., None] * v, g, beta, s0, return_trajectory=True)
    ref = recurrence_reference(q, k, beta[..., None] * v, g, beta, s0)
    assert all(torch.isfinite(t).all() for t in fast)
    assert torch.allclose(fast[0], ref[0], atol=1e-5)


def test_matches_transformers_reference_kernels():
    """transformers' pure-torch gated delta rule (the CPU fallback of fla's kernels) as the oracle."""
    q, k, v, beta, g, s0 = factors(2, 70, 3, 8, 12, seed=5)
    ours = recurrence_chunked(q, k, beta[..., None] * v, g, beta, s0)
    unscaled_q = q * q.shape[-1] ** 0.5  # the kernels scale q themselves
    chunk_out, chunk_state = torch_chunk_gated_delta_rule(unscaled_q, k, v, g, beta, initial_state=s0,
                                                          output_final_state=True)
    step_out, step_state = torch_recurrent_gated_delta_rule(unscaled_q, k, v, g, beta, initial_state=s0,
                                                            output_final_state=True)
    for out, state in ((chunk_out, chunk_state), (step_out, step_state)):
        assert torch.allclose(ours[0], out, atol=1e-5)
        assert torch.allclose(ours[1], state, atol=1e-5)


def test_recurrence_matches_paper_form():
    """S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, checked against the double-precision loop."""
    q, k, v, beta, g, _ = factors(1, 20, 2, 5, 7, seed=2)
    reads, final, traj = naive_edited_layer(q, k, v, beta, g)
    ours = recurrence_chunked(q, k, beta[..., None] * v, g, beta, return_trajectory=True, chunk_size=8)
    assert torch.allclose(ours[0], reads.float(), atol=1e-5)
    assert torch.allclose(ours[2], traj.float(), atol=1e-5)


def test_propagated_edits_equal_naive_edited_run():
    q, k, v, beta, g, _ = factors(3, 90, 2, 6, 9, seed=7)
    gen = torch.Generator().manual_seed(8)
    cells_before = [(0, 3, 1), (2, 50, 0), (0, 64, 0)]
    cells_after = [(1, 10, 1), (0, 64, 0), (2, 89, 1)]
    cells_set = [(1, 40, 0)]
    mats = lambda cells: {c: torch.randn(6, 9, generator=gen) for c in cells}  # noqa: E731
    before, after, sets = mats(cells_before), mats(cells_after), mats(cells_set)
    base_reads, base_final, base_traj = recurrence_reference(q, k, beta[..., None] * v, g, beta, return_trajectory=True)


    set_corrections = {c: m - base_traj[c] for c, m in sets.items()}
    all_edits = StateEdits.concat(state_edits(before), state_edits(after, after_read=True),
                                  state_edits(set_corrections, assign=True))
    read_delta, final_delta, traj_delta = propagate_edits(q, k, g, beta, all_edits, return_trajectory=True)
    ref_reads, ref_final, ref_traj = naive_edited_layer(q, k, v, beta, g, adds_before=before, adds_after=after,
                                                        state_sets=sets)
    assert torch.allclose(base_reads + read_delta, ref_reads.float(), atol=1e-5)
    assert torch.allclose(base_final + final_delta, ref_final.float(), atol=1e-5)
    assert torch.allclose(base_traj + traj_delta, ref_traj.float(), atol=1e-5)

    only_row_one = state_edits({(1, 10, 1): after[(1, 10, 1)]}, after_read=True)
    read_delta, _, _ = propagate_edits(q, k, g, beta, only_row_one)
    assert torch.count_nonzero(read_delta[[0, 2]]) == 0
    assert torch.count_nonzero(read_delta[1, :11]) == 0  # after the read at 10: position 10 is unchanged
    assert torch.count_nonzero(read_delta[1, 11:]) > 0


@pytest.mark.parametrize("chunk", [8, 64])
def test_states_at_selected_positions(chunk):
    q, k, v, beta, g, s0 = factors(2, 45, 3, 5, 7, seed=9)
    positions = torch.tensor([0, 7, 8, 30, 44, 8])
    _, _, traj = recurrence_reference(q, k, beta[..., None] * v, g, beta, s0, return_trajectory=True)
    _, _, picked = recurrence_chunked(q, k, beta[..., None] * v, g, beta, s0, chunk_size=chunk, state_positions=positions)
    assert picked.shape == (2, 6, 3, 5, 7)
    assert torch.allclose(picked, traj[:, positions], atol=2e-5)
    per_row = torch.tensor([[0, 7, 8, 30], [44, 8, 18, 1]])  # each batch row its own positions
    _, _, picked = recurrence_chunked(q, k, beta[..., None] * v, g, beta, s0, chunk_size=chunk, state_positions=per_row)
    _, _, picked_ref = recurrence_reference(q, k, beta[..., None] * v, g, beta, s0, state_positions=per_row)
    for row in range(2):
        assert torch.allclose(picked[row], traj[row, per_row[row]], atol=2e-5)
        assert torch.equal(picked_ref[row], traj[row, per_row[row]])


@pytest.mark.parametrize("delta_rule", [True, False], ids=["delta-rule", "no-erase"])
def test_gradients_through_the_chunked_trajectory_equal_the_reference(delta_rule):
    """The trajectory (what hook_state shows) is differentiable in every input, as in the step reference."""
    q, k, v, beta, g, s0 = factors(1, 40, 2, 6, 9, seed=3)
    weights = torch.randn(1, 40, 2, 6, generator=torch.Generator().manual_seed(4))

    def grads(op, **options):
        inputs = [x.clone().requires_grad_() for x in (q, k, v, beta, g, s0)]
        q_, k_, v_, beta_, g_, s0_ = inputs
        _, _, traj = op(q_, k_, beta_[..., None] * v_, g_, beta_ if delta_rule else None, s0_,
                        return_trajectory=True, **options)
        (traj.sum(-1) * weights).sum().backward()
        return [x.grad for x in inputs]

    for fast, ref in zip(grads(recurrence_chunked, chunk_size=16), grads(recurrence_reference)):
        if ref is None:  # an input the output does not depend on (the query, for the trajectory)
            assert fast is None or not fast.any()
        else:
            assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-4)


def test_large_trajectories_use_the_huge_page_buffer_and_stay_exact():
    """Trajectories of 16 MiB and more are written into a separately mapped buffer (huge pages where Linux has
    them), aligned to a huge page, usable like any tensor, with the same values as the step reference."""
    import mmap

    from writesae_lens.ops.gated_delta import trajectory_buffer

    buffer = trajectory_buffer((4, 1024, 1024), "cpu")  # 16 MiB
    assert buffer.shape == (4, 1024, 1024) and buffer.dtype == torch.float32
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert buffer.data_ptr() % (2 << 20) == 0
    buffer.fill_(1.5)
    assert float(buffer.sum()) == 1.5 * buffer.numel()
    q, k, v, beta, g, s0 = factors(1, 300, 4, 64, 64, seed=9)  # trajectory 300 * 4 * 64 * 64 * 4 B = 19.7 MB
    ref = recurrence_reference(q, k, beta[..., None] * v, g, beta, s0, return_trajectory=True)[2]
    fast = recurrence_chunked(q, k, beta[..., None] * v, g, beta, s0, return_trajectory=True)[2]
    assert torch.allclose(fast, ref, atol=1e-4)


def test_all_finite_is_exact_including_overflowing_sums():
    from writesae_lens.ops.finite import all_finite

    x = torch.full((4, 3), 3e38)  # finite entries whose float32 sum overflows
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 1] = bad
        assert not all_finite(y)
    both = torch.tensor([float("inf"), -float("inf"), 1.0])  # the sum is NaN
    assert not all_finite(both)
    assert all_finite(torch.zeros(0))
