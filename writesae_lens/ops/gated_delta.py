"""The matrix recurrence shared by Gated DeltaNet and Mamba-2, in two implementations that must agree.

One head keeps a state ``S`` of shape ``[d_k, d_v]`` (key axis first, as transformers' caches store it). At each
token ``t`` the state is moved by a transition and receives an additive write:

    S_t = a_t (I - e_t k_t k_t^T) S_{t-1} + k_t u_t^T          (recurrence)
    o_t = S_t^T q_t                                               (read, after the write)

with ``a_t = exp(log_decay_t)``. For Gated DeltaNet ``e_t = beta_t`` (the delta rule's erase strength) and the write
is ``u_t = beta_t v_t``; for Mamba-2 there is no erase (``erase_strength=None``) and ``u_t = dt_t x_t``. Keeping the
write value ``u`` separate from the erase strength is what lets an edit change the write without touching the
transition (the paper's "native write" is exactly the term ``k_t u_t^T``).

``recurrence_reference`` is the token-by-token truth. ``recurrence_chunked`` is the fast path (the WY/UT-transform
chunked algorithm of the delta-rule literature, generalised to a free write value), and can also return the whole
state trajectory from chunked algebra instead of a Python loop per token.

Tensor layout everywhere: ``[batch, pos, head, ...]`` like the hooks; states are ``[batch, head, d_k, d_v]``.
"""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from .precision import compute_dtype, upcast

DEFAULT_CHUNK_SIZE = 64


def recurrence_reference(
    query: Float[Tensor, "batch pos head d_k"],
    key: Float[Tensor, "batch pos head d_k"],
    write_value: Float[Tensor, "batch pos head d_v"],
    log_decay: Float[Tensor, "batch pos head"],
    erase_strength: Float[Tensor, "batch pos head"] | None = None,
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    return_trajectory: bool = False,
    state_positions: Int[Tensor, "*rows n_sel"] | None = None,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch _ head d_k d_v"] | None,
]:
    """Token-by-token recurrence: returns (reads, final state, states). Computes in fp32.

    The third output is the whole trajectory ``[batch, pos, head, d_k, d_v]`` (``S_t`` after the write at t) with
    ``return_trajectory``, only the states at ``state_positions`` ``[batch, n_sel, head, d_k, d_v]`` when those are
    given (``[n_sel]``, the same positions in every row, or ``[batch, n_sel]``, each row its own), else None.
    """
    if state_positions is not None:
        reads, state, trajectory = recurrence_reference(
            query, key, write_value, log_decay, erase_strength, initial_state, return_trajectory=True
        )
        return reads, state, at_positions(trajectory, state_positions)
    batch, n_pos, n_heads, d_k = key.shape
    d_v = write_value.shape[-1]
    state = initial_state_or_zeros(initial_state, batch, n_heads, d_k, d_v, key.device, compute_dtype(write_value))
    reads, trajectory = [], []
    for t in range(n_pos):
        q_t, k_t, u_t = (upcast(x[:, t]) for x in (query, key, write_value))  # [batch, head, d]
        state = state * upcast(log_decay[:, t]).exp()[..., None, None]
        if erase_strength is not None:
            remembered = torch.einsum("bhkv,bhk->bhv", state, k_t)  # S^T k: what the state recalls for k
            u_t = u_t - upcast(erase_strength[:, t])[..., None] * remembered
        state = state + k_t[..., :, None] * u_t[..., None, :]
        reads.append(torch.einsum("bhkv,bhk->bhv", state, q_t))
        if return_trajectory:
            trajectory.append(state)
    if n_pos == 0:
        empty_reads = write_value.new_zeros(batch, 0, n_heads, d_v, dtype=compute_dtype(write_value))
        empty_traj = write_value.new_zeros(batch, 0, n_heads, d_k, d_v, dtype=compute_dtype(write_value))
        return empty_reads, state, (empty_traj if return_trajectory else None)
    traj = torch.stack(trajectory, dim=1) if return_trajectory else None
    return torch.stack(reads, dim=1), state, traj


def recurrence_chunked(
    query: Float[Tensor, "batch pos head d_k"],
    key: Float[Tensor, "batch pos head d_k"],
    write_value: Float[Tensor, "batch pos head d_v"],
    log_decay: Float[Tensor, "batch pos head"],
    erase_strength: Float[Tensor, "batch pos head"] | None = None,
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    return_trajectory: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    state_positions: Int[Tensor, "*rows n_sel"] | None = None,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch _ head d_k d_v"] | None,
]:
    """Same contract as ``recurrence_reference``, computed chunk by chunk in fp32.

    Inside a chunk with start state ``S`` and cumulative log decay ``G_i = sum_{j<=i} log_decay_j``, write
    ``delta_i`` for the effective value stored at ``i`` (``S_i = a_i S_{i-1} + k_i delta_i^T``). Then

        delta_i = u_i - e_i [exp(G_i) S^T k_i + sum_{j<i} exp(G_i - G_j) (k_j . k_i) delta_j]

    is a unit-lower-triangular system ``(I + L) delta = u - diag(e exp(G)) K S``, solved once per chunk as
    ``delta = U - W S``. Reads and the next chunk's start state follow in closed form:

        o_i   = exp(G_i) S^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) delta_j
        S_end = exp(G_last) S + sum_j exp(G_last - G_j) k_j delta_j^T
        S_i   = exp(G_i) S + sum_{j<=i} exp(G_i - G_j) k_j delta_j^T          (trajectory, only if asked)
    """
    batch, n_pos, n_heads, d_k = key.shape
    d_v = write_value.shape[-1]
    state = initial_state_or_zeros(initial_state, batch, n_heads, d_k, d_v, key.device, compute_dtype(write_value))
    if n_pos == 0:
        return recurrence_reference(query, key, write_value, log_decay, erase_strength, state, return_trajectory,
                                    state_positions)

    pad = (-n_pos) % chunk_size
    n_chunks = (n_pos + pad) // chunk_size

    def chunked(x: Tensor) -> Tensor:
        # [batch, pos, head, *rest] -> [batch, head, chunk, chunk_pos, *rest], fp32, zero-padded at the end
        x = upcast(x).transpose(1, 2).contiguous()  # solves and matmuls are much faster on contiguous operands
        if pad:
            x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(batch, n_heads, n_chunks, chunk_size, *x.shape[3:])

    q, k, u = chunked(query), chunked(key), chunked(write_value)  # [b, h, n, C, d]
    cum_log_decay = chunked(log_decay).cumsum(-1)  # G: [b, h, n, C]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=key.device).tril()
    # decay_between[i, j] = exp(G_i - G_j) for j <= i, else 0
    decay_between = (cum_log_decay[..., :, None] - cum_log_decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    decay_from_start = cum_log_decay.exp()  # exp(G_i): [b, h, n, C]

    if erase_strength is not None:
        e = chunked(erase_strength)[..., None]  # [b, h, n, C, 1]
        # (I + L): only the strictly lower triangle is read, the solver takes the unit diagonal as given
        system = e * (k @ k.transpose(-1, -2)) * decay_between
        new_values = torch.linalg.solve_triangular(system, u, upper=False, unitriangular=True)  # U
        state_readout = torch.linalg.solve_triangular(
            system, e * k * decay_from_start[..., None], upper=False, unitriangular=True
        )  # W
    else:
        new_values, state_readout = u, None

    read_weights = (q @ k.transpose(-1, -2)) * decay_between  # [b, h, n, C, C]
    q_decayed = q * decay_from_start[..., None]
    decay_to_end = (cum_log_decay[..., -1:] - cum_log_decay).exp()  # exp(G_last - G_j)
    k_to_end = k * decay_to_end[..., None]
    chunk_decay = decay_from_start[..., -1, None, None]  # [b, h, n, 1, 1]

    reads = torch.empty(batch, n_heads, n_chunks, chunk_size, d_v, device=key.device, dtype=compute_dtype(write_value))
    keep = return_trajectory or state_positions is not None
    deltas = torch.empty_like(reads) if keep else None
    start_states = []
    for c in range(n_chunks):
        delta = new_values[:, :, c]
        if state_readout is not None:
            delta = delta - state_readout[:, :, c] @ state
        reads[:, :, c] = q_decayed[:, :, c] @ state + read_weights[:, :, c] @ delta
        if keep:
            deltas[:, :, c] = delta
            start_states.append(state)
        state = state * chunk_decay[:, :, c] + k_to_end[:, :, c].transpose(-1, -2) @ delta

    reads = reads.reshape(batch, n_heads, -1, d_v)[:, :, :n_pos].transpose(1, 2).contiguous()
    trajectory = None
    if state_positions is not None:
        trajectory = _states_at(torch.stack(start_states, dim=2), k, deltas, cum_log_decay, state_positions)
    elif return_trajectory:
        trajectory = _chunk_trajectories(torch.stack(start_states, dim=2), k, deltas, cum_log_decay)
        trajectory = trajectory.reshape(batch, n_chunks * chunk_size, n_heads, d_k, d_v)[:, :n_pos]
    return reads, state, trajectory


def _states_at(starts: Tensor, k: Tensor, deltas: Tensor, cum_log_decay: Tensor, positions: Tensor) -> Tensor:
    """``S_p`` at a few positions only, ``[batch, n_sel, head, d_k, d_v]``: from the chunk's start state and the
    masked sum over that chunk's first positions (cost n_sel * chunk * d_k * d_v, no trajectory). ``positions`` is
    ``[n_sel]`` (every row) or ``[batch, n_sel]`` (per row).
    starts [b, h, n, d_k, d_v]; k [b, h, n, C, d_k]; deltas [b, h, n, C, d_v]; cum_log_decay [b, h, n, C]."""
    batch, _, n_chunks, chunk, _ = k.shape
    positions = positions.to(k.device).long().expand(batch, -1)  # [b, n_sel]
    which, offset = positions // chunk, positions % chunk
    flat = (torch.arange(batch, device=k.device)[:, None] * n_chunks + which).flatten()  # (row, chunk) of each

    def per_chunk(x: Tensor) -> Tensor:  # [b, h, n, ...] -> [b, n_sel, h, ...]: each position's chunk of its row
        rows_chunks = x.transpose(1, 2).reshape(batch * n_chunks, *x.shape[1:2], *x.shape[3:])
        return rows_chunks.index_select(0, flat).unflatten(0, (batch, -1))  # (faster than advanced indexing)

    g = per_chunk(cum_log_decay)  # [b, n_sel, h, C]
    g_at = g.gather(-1, offset[:, :, None, None].expand(*g.shape[:3], 1))  # G_p: [b, n_sel, h, 1]
    upto = torch.arange(chunk, device=k.device) <= offset[..., None]  # [b, n_sel, C]
    weights = (g_at - g).masked_fill(~upto[:, :, None], float("-inf")).exp()  # exp(G_p - G_j) for j <= p
    summed = (per_chunk(k) * weights[..., None]).transpose(-1, -2) @ per_chunk(deltas)  # [b, n_sel, h, d_k, d_v]
    return g_at.exp()[..., None] * per_chunk(starts) + summed


def at_positions(x: Tensor, positions: Tensor) -> Tensor:
    """``x[:, positions]`` for ``x`` [batch, pos, ...]: ``positions`` [n_sel] picks the same positions in every row,
    [batch, n_sel] each row its own; the result is [batch, n_sel, ...]."""
    positions = positions.to(x.device).long()
    if positions.dim() == 1:
        return x[:, positions]
    return x[torch.arange(x.shape[0], device=x.device)[:, None], positions]


def _chunk_trajectories(starts: Tensor, k: Tensor, deltas: Tensor, cum_log_decay: Tensor) -> Tensor:
    """Every state of every chunk, ``S_i = a_i S_{i-1} + k_i delta_i^T`` from the chunk's start state, returned as
    ``[batch, chunk, chunk_pos, head, d_k, d_v]``.

    Once the deltas are known the states need no solve: one pass over the chunk positions, all chunks at once (2
    multiply-adds per entry; faster on CPU than the equivalent masked matmuls). Without autograd each state is
    computed in its slot of the output, from the previous slot, with no temporaries.
    starts [b, h, n, d_k, d_v]; k [b, h, n, C, d_k]; deltas [b, h, n, C, d_v]; cum_log_decay [b, h, n, C].
    """
    b, h, n, chunk, d_k = k.shape
    d_v = deltas.shape[-1]
    step_decay = torch.diff(cum_log_decay, dim=-1, prepend=torch.zeros_like(cum_log_decay[..., :1])).exp()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (starts, k, deltas, cum_log_decay)):
        state, states = starts, []  # out= writes have no autograd: build each state, then stack them (copying
        for i in range(chunk):  # each into a slot instead would make the backward copy the whole buffer per slot)
            state = torch.addcmul(state * step_decay[..., i, None, None], k[..., i, :, None], deltas[..., i, None, :])
            states.append(state.transpose(1, 2))
        return torch.stack(states, dim=2)
    states = trajectory_buffer((b, n, chunk, h, d_k, d_v), starts.device, starts.dtype)
    # the factors in the output's order: [b, n, C, h, ...]
    decay = step_decay.permute(0, 2, 3, 1).contiguous()[..., None, None]
    keys = k.permute(0, 2, 3, 1, 4).contiguous()[..., None]
    values = deltas.permute(0, 2, 3, 1, 4).contiguous()[..., None, :]
    previous = starts.transpose(1, 2)
    for i in range(chunk):
        slot = states[:, :, i]  # [b, n, h, d_k, d_v]
        torch.mul(previous, decay[:, :, i], out=slot)
        slot.addcmul_(keys[:, :, i], values[:, :, i])
        previous = slot
    return states


_HUGE_PAGE = 2 << 20
_HUGE_PAGE_MIN_BYTES = 16 << 20


def trajectory_buffer(shape: tuple[int, ...], device, dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised tensor for a state trajectory, by far the largest tensor of a forward.

    Fresh memory costs one page fault per 4 KiB page on first write, which on CPU takes longer than computing the
    states. Large CPU buffers are therefore mapped with ``MADV_HUGEPAGE`` where Linux offers transparent huge pages
    (one fault per 2 MiB); elsewhere, and for small or non-CPU buffers, this is ``torch.empty``. The mapping lives
    as long as any tensor that uses it.
    """
    device = torch.device(device)
    numel = math.prod(shape)
    n_bytes = numel * dtype.itemsize
    if device.type != "cpu" or n_bytes < _HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        buffer = mmap.mmap(-1, n_bytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.frombuffer(buffer, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE_PAGE  # start on a huge-page boundary
    return raw[start:start + n_bytes].view(dtype).view(shape)


def recurrence(
    query: Tensor,
    key: Tensor,
    write_value: Tensor,
    log_decay: Tensor,
    erase_strength: Tensor | None = None,
    initial_state: Tensor | None = None,
    return_trajectory: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    step_threshold: int = 8,
    state_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Dispatch: the step loop for a handful of tokens (decoding), the chunked algorithm otherwise."""
    if key.shape[1] <= step_threshold:
        return recurrence_reference(query, key, write_value, log_decay, erase_strength, initial_state, return_trajectory,
                                    state_positions)
    return recurrence_chunked(
        query, key, write_value, log_decay, erase_strength, initial_state, return_trajectory, chunk_size,
        state_positions,
    )


def initial_state_or_zeros(initial_state: Tensor | None, batch: int, n_heads: int, d_k: int, d_v: int, device,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    if initial_state is None:
        return torch.zeros(batch, n_heads, d_k, d_v, device=device, dtype=dtype)
    expected = (batch, n_heads, d_k, d_v)
    if tuple(initial_state.shape) != expected:
        raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}; expected {expected} [batch, head, d_k, d_v]")
    return upcast(initial_state)
