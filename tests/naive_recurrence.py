"""A deliberately plain token-by-token reference of a recurrent layer with edits, for the edit tests.

Everything is written out per token with Python dicts of edits, so that it shares no code with the library. One loop
(``naive_matrix_recurrence``) serves every family; each family's reference only spells out its transition matrix.
"""

from __future__ import annotations

import torch


def naive_edited_layer(
    q, k, v, beta, g,  # native factors from an unedited run: [b, p, h, d_k|d_v] and [b, p, h]
    delta_rule: bool = True,
    write_k=None, write_v=None, write_beta=None,  # replacements for the write (same shapes) or None
    adds_before: dict | None = None,  # {(b, t, h): [d_k, d_v]} added to the write at t
    adds_after: dict | None = None,  # {(b, t, h): [d_k, d_v]} added after the read at t
    state_sets: dict | None = None,  # {(b, t, h): [d_k, d_v]} replacing S_t (the read at t sees it)
    initial_state=None,
):
    """Gated DeltaNet (``delta_rule``) or Mamba-2: transition ``a (I - beta k k^T)`` or ``a I``, ``a = exp(g)``.
    Returns (reads [b, p, h, d_v], final state [b, h, d_k, d_v], trajectory [b, p, h, d_k, d_v])."""
    k, beta, g = (x.double() for x in (k, beta, g))
    d_k = k.shape[-1]

    def transition(b, t, h):
        a = torch.exp(g[b, t, h])
        out = a * torch.eye(d_k, dtype=torch.double)
        if delta_rule:
            out = out - a * beta[b, t, h] * torch.outer(k[b, t, h], k[b, t, h])
        return out

    return naive_matrix_recurrence(q, k, v, beta, transition, write_k, write_v, write_beta, adds_before, adds_after,
                                   state_sets, initial_state)


def naive_matrix_recurrence(
    q, k, v, beta,  # the read query and the native write factors: [b, p, h, d_k|d_v] and [b, p, h]
    transition,  # (b, t, h) -> [d_k, d_k] float64: S_t = transition @ S_{t-1} + write
    write_k=None, write_v=None, write_beta=None, adds_before=None, adds_after=None, state_sets=None,
    initial_state=None,
):
    """The loop every family's reference shares, per (batch row, head, token) with explicit matrices in float64:
    ``S_t = T_t S_{t-1} + beta_t k_t v_t^T`` (+ edits), ``read_t = S_t^T q_t``. Edits as in ``naive_edited_layer``.
    Returns (reads [b, p, h, d_v], final state [b, h, d_k, d_v], trajectory [b, p, h, d_k, d_v])."""
    q, k, v, beta = (x.double() for x in (q, k, v, beta))
    wk = k if write_k is None else write_k.double()
    wv = v if write_v is None else write_v.double()
    wb = beta if write_beta is None else write_beta.double()
    adds_before, adds_after, state_sets = adds_before or {}, adds_after or {}, state_sets or {}
    batch, n_pos, n_heads, d_k = k.shape
    d_v = v.shape[-1]
    reads = torch.zeros(batch, n_pos, n_heads, d_v, dtype=torch.double)
    traj = torch.zeros(batch, n_pos, n_heads, d_k, d_v, dtype=torch.double)
    final = torch.zeros(batch, n_heads, d_k, d_v, dtype=torch.double)
    for b in range(batch):
        for h in range(n_heads):
            S = torch.zeros(d_k, d_v, dtype=torch.double) if initial_state is None else initial_state[b, h].double()
            for t in range(n_pos):
                S = transition(b, t, h) @ S + wb[b, t, h] * torch.outer(wk[b, t, h], wv[b, t, h])
                if (b, t, h) in adds_before:
                    S = S + adds_before[(b, t, h)].double()
                if (b, t, h) in state_sets:
                    S = state_sets[(b, t, h)].double().clone()
                traj[b, t, h] = S
                reads[b, t, h] = S.T @ q[b, t, h]
                if (b, t, h) in adds_after:
                    S = S + adds_after[(b, t, h)].double()
            final[b, h] = S
    return reads, final, traj
