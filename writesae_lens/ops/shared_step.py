"""One token of the recurrence for many rows that start from a few shared states, without a state per row.

The substitution test runs, per firing, a native row and three edited rows for one token from the same cache
snapshot. Gathering that snapshot's state once per row and stepping each copy costs four copies of every later
layer's state and four passes over each; at a real model's shape (16 heads of 128 x 128 per layer) that is most of
the test's time. One step's read needs only two products of the shared state per row:

    S_r     = S[source_r] + E_r                       (E_r: an optional edit of one head, per row)
    S_r'    = diag(exp w) S_r - ea (eb^T S_r) + k u^T  (the step: every family's transition in DPLR form)
    o_r     = S_r'^T q = S_r^T (exp(w) * q) - (ea . q) S_r^T eb + (k . q) u

so the rows of one source share one batched product with their stacked vectors (``S^T [x_1 .. x_m]``), and no
per-row state exists. Families without an erase (Mamba-2) have ``ea = eb = None``; a scalar log decay per head
(Gated DeltaNet, Mamba-2) is ``w`` of shape [rows, head] (``ops.adjoint.dplr_form`` writes the delta rule this way).

``shared_step_reads_reference`` gathers a state per row and runs the step literally: the readable definition the
tests hold the fast one to.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .precision import upcast


def shared_step_reads_reference(
    query: Float[Tensor, "rows head d_k"],
    write_key: Float[Tensor, "rows head d_k"],
    write_value: Float[Tensor, "rows head d_v"],
    log_decay: Float[Tensor, "rows head"] | Float[Tensor, "rows head d_k"],
    erase_a: Float[Tensor, "rows head d_k"] | None,
    erase_b: Float[Tensor, "rows head d_k"] | None,
    shared: Float[Tensor, "n_src head d_k d_v"],
    source: Int[Tensor, " rows"],
    edit: Float[Tensor, "rows d_k d_v"] | None = None,
    edit_head: int | None = None,
) -> Float[Tensor, "rows head d_v"]:
    """The read of one step per row from its own copy of its source state (plus its edit), literally."""
    before = upcast(shared)[source].clone()  # S_r: [rows, head, d_k, d_v]
    if edit is not None:
        before[:, edit_head] += upcast(edit)
    decay = upcast(log_decay).exp()
    decay = decay[..., None, None] if decay.dim() == 2 else decay[..., :, None]  # scales the key axis
    state = decay * before
    if erase_a is not None:  # - ea (eb^T S_r): the erase reads the state before the step
        recalled = torch.einsum("rhkv,rhk->rhv", before, upcast(erase_b))
        state = state - upcast(erase_a)[..., :, None] * recalled[..., None, :]
    state = state + upcast(write_key)[..., :, None] * upcast(write_value)[..., None, :]
    return torch.einsum("rhkv,rhk->rhv", state, upcast(query))


def shared_step_reads(
    query: Float[Tensor, "rows head d_k"],
    write_key: Float[Tensor, "rows head d_k"],
    write_value: Float[Tensor, "rows head d_v"],
    log_decay: Float[Tensor, "rows head"] | Float[Tensor, "rows head d_k"],
    erase_a: Float[Tensor, "rows head d_k"] | None,
    erase_b: Float[Tensor, "rows head d_k"] | None,
    shared: Float[Tensor, "n_src head d_k d_v"],
    source: Int[Tensor, " rows"],
    edit: Float[Tensor, "rows d_k d_v"] | None = None,
    edit_head: int | None = None,
) -> Float[Tensor, "rows head d_v"]:
    """``shared_step_reads_reference`` with one batched product per source state (module docstring); computes in
    fp32 (fp64 inputs stay fp64)."""
    q, k, u = upcast(query), upcast(write_key), upcast(write_value)
    w = upcast(log_decay)
    decayed_q = q * (w.exp()[..., None] if w.dim() == 2 else w.exp())  # exp(w) * q: [rows, head, d_k]
    vectors = [decayed_q] if erase_a is None else [decayed_q, upcast(erase_b)]
    recalled = _products_with_sources(upcast(shared), source, torch.stack(vectors, dim=-1))  # [rows, head, d_v, n]
    reads = recalled[..., 0] + (k * q).sum(-1, keepdim=True) * u
    if erase_a is not None:
        reads = reads - (upcast(erase_a) * q).sum(-1, keepdim=True) * recalled[..., 1]
    if edit is not None:  # E^T x for the edited head, per row
        e = upcast(edit)  # [rows, d_k, d_v]
        at_head = torch.stack([v[:, edit_head] for v in vectors], dim=-1)  # [rows, d_k, n]
        edit_recalled = e.transpose(-1, -2) @ at_head  # [rows, d_v, n]
        correction = edit_recalled[..., 0]
        if erase_a is not None:
            correction = correction - (upcast(erase_a)[:, edit_head] * q[:, edit_head]).sum(-1, keepdim=True) * \
                edit_recalled[..., 1]
        reads = reads.clone()
        reads[:, edit_head] += correction
    return reads


def _products_with_sources(shared: Tensor, source: Tensor, vectors: Tensor) -> Tensor:
    """``shared[source[r]]^T vectors[r]`` for every row r, [rows, head, d_v, n], from one batched product per source
    used: the rows of a source are stacked as columns (padded with zeros to the busiest source's count).
    shared [n_src, head, d_k, d_v]; source [rows]; vectors [rows, head, d_k, n]."""
    rows, n_heads, d_k, n = vectors.shape
    source = source.to(shared.device).long()
    used, which = torch.unique(source, return_inverse=True)  # which: [rows], the row's source among the used
    order = torch.argsort(which, stable=True)
    counts = torch.bincount(which, minlength=len(used))
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(which)
    slot[order] = torch.arange(rows, device=which.device) - starts[which[order]]  # rank of the row in its source
    width = int(counts.max())
    stacked = vectors.new_zeros(len(used), n_heads, d_k, width, n)
    stacked[which, :, :, slot] = vectors
    states = shared if len(used) == shared.shape[0] else shared.index_select(0, used)  # [n_used, head, d_k, d_v]
    products = states.transpose(-1, -2) @ stacked.flatten(-2)  # [n_used, head, d_v, width * n]
    return products.unflatten(-1, (width, n))[which, :, :, slot]  # [rows, head, d_v, n]
