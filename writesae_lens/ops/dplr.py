"""The diagonal-plus-low-rank (DPLR) matrix recurrence of RWKV-7, in two implementations that must agree.

One head keeps a state ``S`` of shape ``[d_k, d_v]`` (key axis first, as fla's caches store it). At each token ``t``
the state is moved by a per-key-channel decay plus a rank-1 erase, and receives an additive write:

    S_t = (diag(exp(w_t)) - ea_t eb_t^T) S_{t-1} + k_t u_t^T          (recurrence)
    o_t = S_t^T q_t                                                   (read, after the write)

``w_t`` is the log decay per key channel ``[d_k]``; ``ea_t``, ``eb_t`` are the erase factors ``[d_k]``: the erase
reads the state along ``eb_t`` (``x_t = S_{t-1}^T eb_t``, the value the state recalls) and removes ``x_t`` along
``ea_t``. Note that the erase acts on the *undecayed* previous state.

How fla's RWKV-7 maps onto it (``fla/layers/rwkv7.py``, fla 0.6.0): the layer calls
``chunk_rwkv7(r, w, k, v, a=-kk, b=kk * a, scale=1.)``, i.e. ``chunk_dplr_delta_rule`` whose reference
(``fla/ops/generalized_delta_rule/dplr/naive.py``, ``dplr_recurrence(q, k, v, alpha, beta, gk)``) is

    S_t = exp(gk_t) * S_{t-1} + beta_t (alpha_t^T S_{t-1}) + k_t v_t^T,      o_t = S_t^T (q_t * scale)

so ``ea = kk * a`` (fla's ``beta``, the in-context learning rate ``a`` times the normalised erase key),
``eb = kk`` (fla's ``alpha`` is ``-eb``), ``w = -0.6065 * sigmoid(w_lora(x))`` and ``u = v``. RWKV-7 layers read with
``scale = 1``: ``q = r`` unscaled. (fla's ``dplr_recurrence`` itself always scales q by ``d_k^-1/2``; its chunked and
fused kernels take ``scale``, which the RWKV-7 layer sets to 1.) The fused recurrent kernel
(``fused_mul_recurrent_rwkv7``) computes ``h = exp(w) h + (kk a) (-kk^T h); h += k v^T; o = h^T r`` — the same form.

Keeping the write value ``u`` separate from the transition is what lets an edit change the write without touching the
transition (the paper's "native write" is ``k_t u_t^T``; relative to the decayed state the additive change is that
rank-1 write plus the rank-1 erase ``-ea_t x_t^T``).

``dplr_reference`` is the token-by-token truth; ``dplr_chunked`` the chunked algorithm (a WY-style solve of the
recalled values per chunk). Both return (reads, final state, trajectory or selected states or None), like
``writesae_lens.ops.gated_delta``. ``propagate_dplr_edits`` is ``writesae_lens.ops.state_edits.propagate_edits`` for
this transition.

Tensor layout everywhere: ``[batch, pos, head, ...]`` like the hooks; states are ``[batch, head, d_k, d_v]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from .gated_delta import at_positions, initial_state_or_zeros, trajectory_buffer
from .state_edits import StateEdits, propagate_through
from .precision import compute_dtype, upcast

DEFAULT_CHUNK_SIZE = 16  # the pairwise fallback (see _decayed_pairs) holds [chunk, chunk, d_k] per chunk and head


def dplr_reference(
    query: Float[Tensor, "batch pos head d_k"],
    key: Float[Tensor, "batch pos head d_k"],
    write_value: Float[Tensor, "batch pos head d_v"],
    log_decay: Float[Tensor, "batch pos head d_k"],
    erase_a: Float[Tensor, "batch pos head d_k"],
    erase_b: Float[Tensor, "batch pos head d_k"],
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    return_trajectory: bool = False,
    state_positions: Int[Tensor, "*rows n_sel"] | None = None,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch _ head d_k d_v"] | None,
]:
    """Token-by-token recurrence in fp32: returns (reads, final state, states).

    The third output is the whole trajectory ``[batch, pos, head, d_k, d_v]`` (``S_t`` after the write at t) with
    ``return_trajectory``, only the states at ``state_positions`` ``[batch, n_sel, head, d_k, d_v]`` when those are
    given (``[n_sel]`` or per row ``[batch, n_sel]``), else None.
    """
    batch, n_pos, n_heads, d_k = key.shape
    d_v = write_value.shape[-1]
    state = initial_state_or_zeros(initial_state, batch, n_heads, d_k, d_v, key.device, compute_dtype(write_value))
    keep = return_trajectory or state_positions is not None
    reads = torch.zeros(batch, n_pos, n_heads, d_v, device=key.device, dtype=compute_dtype(write_value))
    trajectory = torch.zeros(batch, n_pos, n_heads, d_k, d_v, device=key.device, dtype=compute_dtype(write_value)) if keep else None
    for t in range(n_pos):
        q_t, k_t, u_t, w_t, a_t, b_t = (upcast(x[:, t]) for x in (query, key, write_value, log_decay, erase_a, erase_b))
        recalled = torch.einsum("bhkv,bhk->bhv", state, b_t)  # x_t = S_{t-1}^T eb_t
        state = state * w_t.exp()[..., None] - a_t[..., :, None] * recalled[..., None, :]  # transition
        state = state + k_t[..., :, None] * u_t[..., None, :]  # write
        reads[:, t] = torch.einsum("bhkv,bhk->bhv", state, q_t)
        if keep:
            trajectory[:, t] = state
    if state_positions is not None:
        trajectory = at_positions(trajectory, state_positions)
    return reads, state, trajectory


def dplr_chunked(
    query: Float[Tensor, "batch pos head d_k"],
    key: Float[Tensor, "batch pos head d_k"],
    write_value: Float[Tensor, "batch pos head d_v"],
    log_decay: Float[Tensor, "batch pos head d_k"],
    erase_a: Float[Tensor, "batch pos head d_k"],
    erase_b: Float[Tensor, "batch pos head d_k"],
    initial_state: Float[Tensor, "batch head d_k d_v"] | None = None,
    return_trajectory: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    state_positions: Int[Tensor, "*rows n_sel"] | None = None,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch _ head d_k d_v"] | None,
]:
    """Same contract as ``dplr_reference``, computed chunk by chunk in fp32.

    Inside a chunk with start state ``S`` and cumulative log decay ``G_i = sum_{j<=i} w_j`` (per key channel;
    ``E_i = G_i - w_i`` the exclusive sum), the recalled values ``x_i = S_{i-1}^T eb_i`` satisfy

        x_i = S^T (exp(E_i) * eb_i) + sum_{j<i} <eb_i, k_j>_{E_i - G_j} u_j - sum_{j<i} <eb_i, ea_j>_{E_i - G_j} x_j

    with ``<x, y>_D = sum_d x_d y_d exp(D_d)``: a unit-lower-triangular system, solved once per chunk as
    ``X = Wt S + Ut``. Reads and the next chunk's start state follow in closed form:

        o_i   = S^T (exp(G_i) * q_i) + sum_{j<=i} (<q_i, k_j>_{G_i - G_j} u_j - <q_i, ea_j>_{G_i - G_j} x_j)
        S_end = exp(G_last) * S + sum_j exp(G_last - G_j) * (k_j u_j^T - ea_j x_j^T)

    The pair products ``<x, y>_{G_i - G_j}`` factor into ``exp(G_i)`` and ``exp(-G_j)`` when every chunk's cumulative
    log decay is small enough for fp32 (``_decayed_pairs``); otherwise every pairwise exponent is formed as a sum of
    log decays over positions inside the chunk (never a ratio of two cumulative products), so nothing overflows for
    decays of any strength (as edits may set). The chunk-to-chunk recurrence is the only sequential step. The
    trajectory, when asked for, is one pass over the chunk positions (all chunks at once) once the x are known;
    selected states are taken from it (so ``state_positions`` costs a trajectory here, unlike ``gated_delta``).
    """
    batch, n_pos, n_heads, d_k = key.shape
    d_v = write_value.shape[-1]
    state = initial_state_or_zeros(initial_state, batch, n_heads, d_k, d_v, key.device, compute_dtype(write_value))
    if n_pos == 0:
        return dplr_reference(query, key, write_value, log_decay, erase_a, erase_b, state, return_trajectory,
                              state_positions)
    pad = (-n_pos) % chunk_size
    n_chunks = (n_pos + pad) // chunk_size

    def chunked(x: Tensor) -> Tensor:
        # [batch, pos, head, d] -> [batch, head, chunk, chunk_pos, d], fp32, zero-padded at the end
        x = F.pad(upcast(x).transpose(1, 2), (0, 0, 0, pad))
        return x.reshape(batch, n_heads, n_chunks, chunk_size, x.shape[-1])

    q, k, u, w, ea, eb = (chunked(x) for x in (query, key, write_value, log_decay, erase_a, erase_b))
    cum = w.cumsum(-2)  # G: [b, h, n, C, d_k]
    exclusive = cum - w  # E
    recall_pair, read_pair = _decayed_pairs(cum, exclusive)
    inverse = _unit_lower_inverse(recall_pair(eb, ea))  # (I + A_ba)^-1, A_ba strictly lower
    recall_u = inverse @ (recall_pair(eb, k) @ u)  # Ut
    recall_s = inverse @ (eb * exclusive.exp())  # Wt
    read_k, read_a = read_pair(q, k), read_pair(q, ea)  # [b, h, n, C, C]
    q_decayed = q * cum.exp()
    to_end = (cum[..., -1:, :] - cum).exp()  # exp(G_last - G_j): [b, h, n, C, d_k]
    k_end, ea_end = k * to_end, ea * to_end
    chunk_decay = cum[..., -1, :].exp()[..., None]  # [b, h, n, d_k, 1]

    # chunk to chunk: S' = exp(G_last) * S + K_end^T U - EA_end^T (Ut + Wt S) = across S + added, [b, h, n, d_k, ...]
    ea_end_t = ea_end.transpose(-1, -2)
    across = torch.diag_embed(chunk_decay[..., 0]) - ea_end_t @ recall_s  # [b, h, n, d_k, d_k]
    added = k_end.transpose(-1, -2) @ u - ea_end_t @ recall_u  # [b, h, n, d_k, d_v]
    start_states = []
    for across_c, added_c in zip(across.unbind(2), added.unbind(2)):  # the only sequential part
        start_states.append(state)
        state = across_c @ state + added_c
    starts = torch.stack(start_states, dim=2)  # [b, h, n, d_k, d_v]
    recalled_all = recall_u + recall_s @ starts  # X: [b, h, n, C, d_v]
    reads = q_decayed @ starts + read_k @ u - read_a @ recalled_all  # [b, h, n, C, d_v]

    reads = reads.reshape(batch, n_heads, -1, d_v)[:, :, :n_pos].transpose(1, 2).contiguous()
    trajectory = None
    if return_trajectory or state_positions is not None:
        trajectory = _chunk_trajectories(starts, k, u, w, ea, recalled_all)
        trajectory = trajectory.reshape(batch, n_chunks * chunk_size, n_heads, d_k, d_v)[:, :n_pos]
        if state_positions is not None:
            trajectory = at_positions(trajectory, state_positions)
    return reads, state, trajectory


FACTORED_LOG_RANGE = 60.0  # |cumulative log decay| below this inside every chunk: exp(+-G) is safe in fp32


def _decayed_pairs(cum: Tensor, exclusive: Tensor):
    """The two decayed pair products of a chunk, as functions of ``(x [b, h, n, C, d], y [b, h, n, C, d])``:
    ``recall(x, y)_ij = <x_i, y_j>_{E_i - G_j}`` for ``j < i`` and ``read(x, y)_ij = <x_i, y_j>_{G_i - G_j}`` for
    ``j <= i`` (zero elsewhere), ``[b, h, n, C, C]``.

    When every cumulative log decay of every chunk lies within +-``FACTORED_LOG_RANGE`` (RWKV-7's own decays are at
    least -0.61 per token, so a chunk of 16 stays above -10), the decay factors into the two sides:
    ``<x_i, y_j>_{G_i - G_j} = (x_i exp(G_i)) . (y_j exp(-G_j))``, one matrix product per chunk. Otherwise (edits that
    set decays of any strength) the pairwise exponents ``G_i - G_j`` are formed explicitly, ``[b, h, n, C, C, d]``,
    which never overflows. Both give the same numbers to fp32 rounding (tests/test_rwkv7_ops.py)."""
    chunk_size = cum.shape[-2]
    idx = torch.arange(chunk_size, device=cum.device)
    upto = idx[:, None] >= idx[None, :]  # j <= i: [C, C]
    before = idx[:, None] > idx[None, :]  # j < i
    if bool(cum.abs().max() < FACTORED_LOG_RANGE):
        grow, shrink, recall_grow = cum.exp(), (-cum).exp(), exclusive.exp()

        def recall(x: Tensor, y: Tensor) -> Tensor:
            return ((x * recall_grow) @ (y * shrink).transpose(-1, -2)).masked_fill(~before, 0.0)

        def read(x: Tensor, y: Tensor) -> Tensor:
            return ((x * grow) @ (y * shrink).transpose(-1, -2)).masked_fill(~upto, 0.0)

        return recall, read
    # pairwise decays exp(G_i - G_j) (j <= i) and exp(E_i - G_j) (j < i), [b, h, n, C, C, d_k]
    read_decay = (cum[..., :, None, :] - cum[..., None, :, :]).masked_fill(~upto[..., None], float("-inf")).exp()
    recall_decay = (exclusive[..., :, None, :] - cum[..., None, :, :]).masked_fill(~before[..., None], float("-inf"))
    recall_decay = recall_decay.exp()
    pair = lambda x, y, decay: torch.einsum("bhnid,bhnjd,bhnijd->bhnij", x, y, decay)  # noqa: E731
    return (lambda x, y: pair(x, y, recall_decay)), (lambda x, y: pair(x, y, read_decay))


def _unit_lower_inverse(strictly_lower: Tensor) -> Tensor:
    """``(I + L)^-1`` for strictly lower-triangular ``L`` ``[..., C, C]`` (the entries on and above the diagonal are
    zero), by forward substitution one row at a time over all chunks at once (much faster on CPU than batched
    ``solve_triangular`` for small C)."""
    chunk = strictly_lower.shape[-1]
    identity = torch.eye(chunk, device=strictly_lower.device, dtype=strictly_lower.dtype)
    if torch.is_grad_enabled() and strictly_lower.requires_grad:  # the row updates below are in place: no autograd
        return torch.linalg.solve_triangular(strictly_lower + identity, identity.expand_as(strictly_lower),
                                             upper=False, unitriangular=True)
    inverse = identity.expand_as(strictly_lower).clone()
    for i in range(1, chunk):  # row i of (I + L) X = I: X_i = e_i - L[i, :i] X[:i]
        inverse[..., i, :] -= (strictly_lower[..., i, None, :i] @ inverse[..., :i, :])[..., 0, :]
    return inverse


def _chunk_trajectories(starts: Tensor, k: Tensor, u: Tensor, w: Tensor, ea: Tensor, recalled: Tensor) -> Tensor:
    """Every state of every chunk, ``S_i = exp(w_i) S_{i-1} + k_i u_i^T - ea_i x_i^T`` from the chunk's start state
    (the recalled ``x`` are known, so no solve), as ``[batch, chunk, chunk_pos, head, d_k, d_v]``. Without autograd
    each state is computed in its slot of the output, from the previous slot, with no temporaries."""
    b, h, n, chunk, d_k = k.shape
    d_v = u.shape[-1]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (starts, k, u, w, ea, recalled)):
        state, states = starts, []  # out= writes have no autograd: build each state, then stack them
        for i in range(chunk):
            state = (state * w[..., i, :, None].exp() + k[..., i, :, None] * u[..., i, None, :]
                     - ea[..., i, :, None] * recalled[..., i, None, :])
            states.append(state.transpose(1, 2))
        return torch.stack(states, dim=2)
    states = trajectory_buffer((b, n, chunk, h, d_k, d_v), starts.device, starts.dtype)
    # the factors in the output's order: [b, n, C, h, ...]
    in_order = lambda x: x.permute(0, 2, 3, 1, 4).contiguous()  # noqa: E731
    decay, keys, erase = (in_order(x)[..., None] for x in (w.exp(), k, ea))
    values, recalls = (in_order(x)[..., None, :] for x in (u, recalled))
    previous = starts.transpose(1, 2)
    for i in range(chunk):
        slot = states[:, :, i]  # [b, n, h, d_k, d_v]
        torch.mul(previous, decay[:, :, i], out=slot)
        slot.addcmul_(keys[:, :, i], values[:, :, i]).addcmul_(erase[:, :, i], recalls[:, :, i], value=-1.0)
        previous = slot
    return states


def dplr_recurrence(
    query: Tensor,
    key: Tensor,
    write_value: Tensor,
    log_decay: Tensor,
    erase_a: Tensor,
    erase_b: Tensor,
    initial_state: Tensor | None = None,
    return_trajectory: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    step_threshold: int = 8,
    state_positions: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Dispatch: the step loop for a handful of tokens (decoding), the chunked algorithm otherwise."""
    if key.shape[1] <= step_threshold:
        return dplr_reference(query, key, write_value, log_decay, erase_a, erase_b, initial_state, return_trajectory,
                              state_positions)
    return dplr_chunked(query, key, write_value, log_decay, erase_a, erase_b, initial_state, return_trajectory,
                        chunk_size, state_positions)


def dplr_transition_step(
    state: Float[Tensor, "batch head d_k d_v"],
    log_decay: Float[Tensor, "batch head d_k"],
    erase_a: Float[Tensor, "batch head d_k"],
    erase_b: Float[Tensor, "batch head d_k"],
) -> Float[Tensor, "batch head d_k d_v"]:
    """One transition with no write: ``(diag(exp(w)) - ea eb^T) S``."""
    recalled = torch.einsum("bhkv,bhk->bhv", state, upcast(erase_b))
    return state * upcast(log_decay).exp()[..., None] - upcast(erase_a)[..., :, None] * recalled[..., None, :]


def propagate_dplr_edits(
    query: Float[Tensor, "batch pos head d_k"],
    log_decay: Float[Tensor, "batch pos head d_k"],
    erase_a: Float[Tensor, "batch pos head d_k"],
    erase_b: Float[Tensor, "batch pos head d_k"],
    edits: StateEdits,
    return_trajectory: bool = False,
) -> tuple[
    Float[Tensor, "batch pos head d_v"],
    Float[Tensor, "batch head d_k d_v"],
    Float[Tensor, "batch pos head d_k d_v"] | None,
]:
    """The correction that ``edits`` make under the DPLR transition: (read corrections, final-state correction,
    correction trajectory or None). Same semantics and ordering as ``state_edits.propagate_edits``: the recurrence is
    linear in the state for fixed transitions, so the correction ``D`` obeys ``D_t = (diag(exp(w_t)) - ea_t eb_t^T)
    D_{t-1}`` between edits; at one position, adds then assigns timed before the read, the read, then adds then
    assigns timed after it. Rows without edits get exact zeros and cost nothing."""

    def free_run(q, factors, zero_writes, state, trajectory):
        # with zero writes the write key is irrelevant: pass zeros
        return dplr_recurrence(q, torch.zeros_like(q), zero_writes, *factors, state, trajectory)

    def step(state, factors):
        return dplr_transition_step(state, *factors)

    return propagate_through(query, (log_decay, erase_a, erase_b), edits, free_run, step, return_trajectory)
