"""The adjoint of the matrix recurrence: the gradient of a loss with respect to every state, from the gradient of the
reads, computed by the same chunked algorithms run backwards in time.

Every family's transition is a diagonal-plus-low-rank matrix acting on the key axis of the state ``[d_k, d_v]``:

    S_t = T_t S_{t-1} + (writes at t),     T_t = diag(exp(w_t)) - ea_t eb_t^T,     read_t = S_t^T q_t

(Mamba-2: ``w_t`` one log decay per head and no erase; Gated DeltaNet: ``w_t = g_t`` on every key channel,
``ea = exp(g) beta k``, ``eb = k``; RWKV-7: its own ``w, ea, eb``). For a loss ``L`` of the reads and of the final
state, ``lam_t = dL/dS_t`` (the state after the write at t, as the read at t sees it and the recurrence carries it on)
obeys the reversed recurrence

    lam_t = q_t (dL/dread_t)^T + T_{t+1}^T lam_{t+1},          lam_{last} = q_last (dL/dread_last)^T + dL/dS_final

which is the forward recurrence again, run from the last position to the first, with the rank-1 write ``q_t g_t^T``
(key q, value g) and the transposed transition ``diag(exp(w)) - eb ea^T`` (the erase factors swapped) one position
later. ``cuts`` marks states that are replaced rather than carried on (a ``hook_state`` edit at that cell): there
``S_c`` does not depend on ``S_{c-1}``, so ``lam_{c-1}`` receives nothing from ``lam_c``.

Pure functions; tensors ``[batch, pos, head, ...]`` as everywhere in ``writesae_lens.ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from .dplr import dplr_recurrence, propagate_dplr_edits
from .gated_delta import recurrence
from .precision import upcast
from .state_edits import StateEdits, propagate_edits


def state_adjoint(
    query: Float[Tensor, "batch pos head d_k"],
    grad_reads: Float[Tensor, "batch pos head d_v"],
    grad_final: Float[Tensor, "batch head d_k d_v"] | None,
    log_decay: Float[Tensor, "batch pos head"] | Float[Tensor, "batch pos head d_k"],
    erase_a: Float[Tensor, "batch pos head d_k"] | None = None,
    erase_b: Float[Tensor, "batch pos head d_k"] | None = None,
    cuts: Bool[Tensor, "batch pos head"] | None = None,
) -> Float[Tensor, "batch pos head d_k d_v"]:
    """``lam_t = dL/dS_t`` for every position (see the module docstring). The transition is given as the forward
    pass uses it (``log_decay`` per head or per key channel, the erase factors or None for a pure decay)."""
    dtype = torch.float64 if torch.float64 in (query.dtype, grad_reads.dtype) else torch.float32
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    query, grad_reads, grad_final, log_decay, erase_a, erase_b = map(
        cast, (query, grad_reads, grad_final, log_decay, erase_a, erase_b)
    )
    # reversed time: position t runs at s = last - t, with the transposed transition of position t + 1 (the identity
    # at the last position, where the final state's gradient enters as the initial state)
    later = lambda x: None if x is None else F.pad(x[:, 1:], (0,) * (2 * (x.dim() - 2)) + (0, 1))  # noqa: E731
    backwards = lambda x: None if x is None else x.flip(1)  # noqa: E731
    q, g = backwards(query), backwards(grad_reads)
    w = backwards(later(log_decay))
    ea, eb = backwards(later(erase_b)), backwards(later(erase_a))  # transposed: the erase factors swap roles
    if ea is None:
        _, _, lam = recurrence(q, q, g, w, None, grad_final, return_trajectory=True)
    else:
        w = w if w.dim() == 4 else w[..., None].expand_as(q)
        _, _, lam = dplr_recurrence(q, q, g, w, ea, eb, grad_final, return_trajectory=True)
    if cuts is not None and bool(cuts[:, 1:].any()):
        lam = lam + _cut_correction(q, w, ea, eb, lam, cuts)
    return lam.flip(1)


def _cut_correction(q: Tensor, w: Tensor, ea: Tensor | None, eb: Tensor | None, lam: Tensor, cuts: Tensor) -> Tensor:
    """In reversed time: after the read at each cut cell the carried adjoint becomes zero (an assign, timed after the
    read, of minus what the uncut run carries), so nothing reaches the positions before the replaced state."""
    n_pos = q.shape[1]
    b, c, h = cuts[:, 1:].nonzero(as_tuple=True)  # a cut at position 0 only separates the initial state
    s = n_pos - 1 - (c + 1)  # reversed position of each cut cell
    edits = StateEdits.build(b, s, h, -lam[b, s, h], assign=True, after_read=True)
    if ea is None:
        return propagate_edits(q, torch.zeros_like(q), w, None, edits, return_trajectory=True)[2]
    return propagate_dplr_edits(q, w, ea, eb, edits, return_trajectory=True)[2]


def dplr_form(log_decay: Tensor, erase_key: Tensor | None, erase_strength: Tensor | None) -> tuple:
    """The delta-rule transition ``exp(g) (I - e k k^T)`` (or ``exp(g) I`` without erase) as ``(w, ea, eb)`` of
    ``diag(exp(w)) - ea eb^T``: ``w = g`` on every key channel, ``ea = exp(g) e k``, ``eb = k``; pure decays stay
    ``(g, None, None)``."""
    if erase_strength is None:
        return log_decay, None, None
    g = upcast(log_decay)
    k = upcast(erase_key)
    return g[..., None].expand_as(k), (g.exp() * upcast(erase_strength))[..., None] * k, k

