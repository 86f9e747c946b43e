"""A deliberately plain token-by-token reference of RWKV-7's state recurrence with edits, for the RWKV-7 tests.

Written out per (batch row, head, token) with explicit [d_k, d_k] transition matrices in float64 and Python dicts of
edits (the loop of ``naive_recurrence.naive_matrix_recurrence``), so that it shares no code with the library:

    S_t = (diag(exp(w_t)) - ea_t eb_t^T) S_{t-1} + c_t k_t v_t^T,     read_t = S_t^T q_t

(``c_t`` is the write strength, 1 in the model; ``ea = kk * a``, ``eb = kk`` for RWKV-7.)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from naive_recurrence import naive_matrix_recurrence


def naive_rwkv7_layer(
    q, k, v, w, ea, eb,  # native factors: [b, p, h, d_k|d_v]
    beta=None,  # write strength [b, p, h] (None: ones)
    write_k=None, write_v=None, write_beta=None,  # replacements for the write (same shapes) or None
    adds_before: dict | None = None,  # {(b, t, h): [d_k, d_v]} added to the write at t
    adds_after: dict | None = None,  # {(b, t, h): [d_k, d_v]} added after the read at t
    state_sets: dict | None = None,  # {(b, t, h): [d_k, d_v]} replacing S_t (the read at t sees it)
    initial_state=None,
):
    """Returns (reads [b, p, h, d_v], final state [b, h, d_k, d_v], trajectory [b, p, h, d_k, d_v]) in float64."""
    w, ea, eb = (x.double() for x in (w, ea, eb))
    if beta is None:
        beta = torch.ones(k.shape[:3], dtype=torch.double)

    def transition(b, t, h):
        return torch.diag(torch.exp(w[b, t, h])) - torch.outer(ea[b, t, h], eb[b, t, h])

    return naive_matrix_recurrence(q, k, v, beta, transition, write_k, write_v, write_beta, adds_before, adds_after,
                                   state_sets, initial_state)


def rwkv7_factors(batch, n_pos, n_heads, d_k, d_v, seed):
    """Random factors shaped like RWKV-7's: r, k, v; w = -0.6065 sigmoid(.) per key channel; kk unit-norm, a in (0, 1);
    ea = kk * a, eb = kk; and a random initial state."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(batch, n_pos, n_heads, d_k, generator=gen) * 0.5
    k = torch.randn(batch, n_pos, n_heads, d_k, generator=gen) * 0.5
    v = torch.randn(batch, n_pos, n_heads, d_v, generator=gen)
    w = -0.6065306597126334 * torch.sigmoid(torch.randn(batch, n_pos, n_heads, d_k, generator=gen) * 2)
    kk = torch.nn.functional.normalize(torch.randn(batch, n_pos, n_heads, d_k, generator=gen), dim=-1)
    a = torch.rand(batch, n_pos, n_heads, d_k, generator=gen)
    s0 = torch.randn(batch, n_heads, d_k, d_v, generator=gen)
    return r, k, v, w, kk * a, kk, s0


FLA_NAIVE_RELPATH = "fla/ops/generalized_delta_rule/dplr/naive.py"


def load_fla_dplr_naive():
    """fla's pure-torch DPLR reference, loaded from the single file (no fla install: importing it through the
    ``fla.ops`` package needs triton). The file is looked up under ``$FLA_SOURCE`` (an unpacked fla wheel or source
    tree), then /tmp/fla_dl/unpacked. Returns the module, or None with the reason as a string."""
    roots = [os.environ.get("FLA_SOURCE"), "/tmp/fla_dl/unpacked"]
    for root in filter(None, roots):
        path = Path(root) / FLA_NAIVE_RELPATH
        if path.is_file():
            if importlib.util.find_spec("einops") is None:
                return None, "fla's naive.py imports einops, which is not installed"
            spec = importlib.util.spec_from_file_location("fla_dplr_naive", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module, ""
    return None, (f"{FLA_NAIVE_RELPATH} not found: `pip download --no-deps flash-linear-attention` and unzip the wheel "
                  "into $FLA_SOURCE (or /tmp/fla_dl/unpacked)")
