"""Propagating sparse edits of a matrix state through the recurrence.

For fixed transitions the recurrence of ``writesae_lens.ops.gated_delta`` is linear in the state, so a run with edits
equals the unedited run plus a *correction* ``D`` that obeys the same transitions with no writes of its own:

    D_t = a_t (I - e_t k_t k_t^T) D_{t-1}        between edits
    D_t <- D_t + M    (an "add" edit at t)       or    D_t <- M    (an "assign" edit at t)
    read correction at t:  D_t^T q_t

Each edit sits at a (batch row, position, head) cell and happens either before the read at its position (it changes
what the read at t sees: an edit of the write itself) or after it (only positions > t see it: an edit of the cache
between two decoding steps). At one position the order is: transition, adds then assigns timed before the read, the
read, adds then assigns timed after the read (an assign replaces the state a hook was shown, which already holds the
adds of its timing).

The correction between edit positions is propagated by the chunked recurrence with zero writes, so the cost is one
extra pass over the positions after the first edit, for the batch rows that have edits; memory grows with the number
of edits (plus one state-sized correction), never with batch x pos x head x d_k x d_v unless a trajectory is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .gated_delta import recurrence
from .precision import compute_dtype, upcast


@dataclass
class StateEdits:
    """A batch of edits, one per entry: the matrix ``matrix[i]`` acts on head ``head[i]`` of batch row ``batch[i]``
    at position ``pos[i]``; ``assign[i]`` replaces the correction instead of adding; ``after_read[i]`` times it after
    the read at that position."""

    batch: Int[Tensor, " n"]
    pos: Int[Tensor, " n"]
    head: Int[Tensor, " n"]
    matrix: Float[Tensor, "n d_k d_v"]
    assign: Bool[Tensor, " n"]
    after_read: Bool[Tensor, " n"]

    @staticmethod
    def build(batch, pos, head, matrix, *, assign: bool = False, after_read: bool = False) -> "StateEdits":
        n = matrix.shape[0]
        flag = lambda value: torch.full((n,), value, dtype=torch.bool, device=matrix.device)  # noqa: E731
        return StateEdits(batch.long(), pos.long(), head.long(), upcast(matrix), flag(assign), flag(after_read))

    @staticmethod
    def concat(*parts: "StateEdits | None") -> "StateEdits | None":
        parts = [p for p in parts if p is not None and len(p) > 0]
        if not parts:
            return None
        return StateEdits(*(torch.cat([getattr(p, f) for p in parts]) for f in StateEdits.__dataclass_fields__))

    def __len__(self) -> int:
        return int(self.matrix.shape[0])


def transition_step(
    state: Float[Tensor, "batch head d_k d_v"],
    key: Float[Tensor, "batch head d_k"],
    log_decay: Float[Tensor, "batch head"],
    erase_strength: Float[Tensor, "batch head"] | None,
) -> Float[Tensor, "batch head d_k d_v"]:
    """One transition with no write: ``a (I - e k k^T) S``."""
    state = state * upcast(log_decay).exp()[..., None, None]
    if erase_strength is not None:
        remembered = torch.einsum("bhkv,bhk->bhv", state, upcast(key))
        state = state - upcast(erase_strength)[..., None, None] * upcast(key)[..., :, None] * remembered[..., None, :]
    return state


def propagate_edits(
    query: Float[Tensor, "batch pos head d_k"],
    key: Float[Tensor, "batch pos head d_k"],
    log_decay: Float[Tensor, "batch pos head"],
    erase_strength: Float[Tensor, "batch pos head"] | None,
    edits: StateEdits,
    return_trajectory: bool = False,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch pos head d_k d_v"] | None,
]:
    """The correction that ``edits`` make: (read corrections, final-state correction, correction trajectory or None).

    The trajectory entry at t is the correction of the state the read at t sees (edits timed after the read at t
    appear from t + 1 on). Rows without edits get exact zeros and cost nothing.
    """

    def free_run(q, factors, zero_writes, state, trajectory):
        k, g, e = factors
        return recurrence(q, k, zero_writes, g, e, state, trajectory)

    def step(state, factors):
        return transition_step(state, *factors)

    return propagate_through(query, (key, log_decay, erase_strength), edits, free_run, step, return_trajectory)


def propagate_through(
    query: Tensor,  # [batch, pos, head, d_k]
    transition: tuple[Tensor | None, ...],  # the transition's factors, each [batch, pos, head, ...] (or None)
    edits: StateEdits,
    free_run: Callable,  # (query, factors, zero writes, state, return_trajectory) -> (reads, state, trajectory)
    step: Callable,  # (state, factors at one position) -> state after one transition with no write
    return_trajectory: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The propagation of ``propagate_edits`` for any transition: ``free_run`` runs the family's recurrence with
    zero writes over a span of positions, ``step`` applies one transition. Shared by every family's ops."""
    batch, n_pos, n_heads, d_k = query.shape
    d_v = edits.matrix.shape[-1]
    device = query.device
    dtype = compute_dtype(query)
    read_delta = torch.zeros(batch, n_pos, n_heads, d_v, device=device, dtype=dtype)
    final_delta = torch.zeros(batch, n_heads, d_k, d_v, device=device, dtype=dtype)
    traj_delta = torch.zeros(batch, n_pos, n_heads, d_k, d_v, device=device, dtype=dtype) if return_trajectory else None
    if len(edits) == 0:
        return read_delta, final_delta, traj_delta

    rows = torch.unique(edits.batch)  # only the rows with edits are propagated
    local_row = torch.full((batch,), -1, dtype=torch.long, device=device)
    local_row[rows] = torch.arange(len(rows), device=device)
    q = upcast(query[rows])
    factors = tuple(upcast(f[rows]) if f is not None else None for f in transition)
    at = lambda index: tuple(f[:, index] if f is not None else None for f in factors)  # noqa: E731
    correction = torch.zeros(len(rows), n_heads, d_k, d_v, device=device, dtype=dtype)
    reads = torch.zeros(len(rows), n_pos, n_heads, d_v, device=device, dtype=dtype)
    traj = torch.zeros(len(rows), n_pos, n_heads, d_k, d_v, device=device, dtype=dtype) if return_trajectory else None

    def run_gap(start: int, stop: int, state: Tensor) -> Tensor:
        """Propagate the correction through positions [start, stop) with no writes; record its reads."""
        if stop <= start:
            return state
        sl = slice(start, stop)
        zeros = torch.zeros(len(rows), stop - start, n_heads, d_v, device=device, dtype=dtype)
        gap_reads, state, gap_traj = free_run(q[:, sl], at(sl), zeros, state, return_trajectory)
        reads[:, sl] = gap_reads
        if traj is not None:
            traj[:, sl] = gap_traj
        return state

    def apply(state: Tensor, selected: Tensor) -> Tensor:
        if not bool(selected.any()):
            return state
        state = state.clone()
        for assign in (False, True):  # adds first, then assigns
            which = selected & (edits.assign == assign)
            if bool(which.any()):
                index = (local_row[edits.batch[which]], edits.head[which])
                state.index_put_(index, edits.matrix[which].to(state.dtype), accumulate=not assign)
        return state

    previous = None
    for p in torch.unique(edits.pos).tolist():
        if previous is not None:
            correction = run_gap(previous + 1, p, correction)
            correction = step(correction, at(p))
        at_p = edits.pos == p
        correction = apply(correction, at_p & ~edits.after_read)
        reads[:, p] = torch.einsum("bhkv,bhk->bhv", correction, q[:, p])
        if traj is not None:
            traj[:, p] = correction
        correction = apply(correction, at_p & edits.after_read)
        previous = p
    correction = run_gap(previous + 1, n_pos, correction)

    read_delta[rows] = reads
    final_delta[rows] = correction
    if traj_delta is not None:
        traj_delta[rows] = traj
    return read_delta, final_delta, traj_delta


def validate_edits(edits: StateEdits, batch: int, n_pos: int, n_heads: int, d_k: int, d_v: int) -> None:
    """Clear errors for edits outside the tensor they act on."""
    checks = (("batch row", edits.batch, batch), ("position", edits.pos, n_pos), ("head", edits.head, n_heads))
    for what, index, size in checks:
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= size):
            raise IndexError(f"state edit {what} out of range: got {index.tolist()}, valid is 0..{size - 1}")
    if tuple(edits.matrix.shape[1:]) != (d_k, d_v):
        raise ValueError(f"state edit matrices have shape {tuple(edits.matrix.shape[1:])}; expected (d_k, d_v) = ({d_k}, {d_v})")
