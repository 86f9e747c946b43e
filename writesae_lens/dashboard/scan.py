"""One pass over held-out passages for the dashboards: every non-zero code of the SAE on one head's state, and the
per-token sums of the head's native key and value vectors (for the token alignment of p and q).

The states come from ``evaluation.firings.head_states`` (the head's own recurrence from its write factors, nothing
after the layer runs) and are encoded with ``sae.encode``, exactly as the substitution test's scan does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..evaluation.firings import check_cell, head_states
from ..ops.finite import all_finite


@dataclass
class DashboardScan:
    """The codes and token statistics of one scan. Sparse arrays sorted by (passage, position, feature)."""

    layer: int
    head: int
    tokens: np.ndarray  # [n_passages, n_pos] int64 token ids
    passage: np.ndarray  # [n_firings] int64
    position: np.ndarray  # [n_firings] int64
    feature: np.ndarray  # [n_firings] int64
    code: np.ndarray  # [n_firings] float32, > 0
    key_sums: Tensor  # [d_vocab, d_k] float64: sum of the native key k_t over the positions holding each token
    value_sums: Tensor  # [d_vocab, d_v] float64: the same for the native value v_t
    token_counts: Tensor  # [d_vocab] int64: positions holding each token

    @property
    def n_positions(self) -> int:
        return int(self.tokens.size)


@torch.no_grad()
def scan_for_dashboards(model, sae, layer: int, head: int, tokens: Tensor, batch_size: int = 8,
                        progress: bool = True, ignore_sae_metadata: bool = False) -> DashboardScan:
    """Scan ``tokens`` ``[n_passages, n_pos]`` (see module doc). Clear errors for a cell or SAE that does not fit
    (``check_cell``) and for an SAE that is not factored (no ``W_dec_key`` / ``W_dec_value``)."""
    check_cell(model, sae, layer, head, ignore_sae_metadata=ignore_sae_metadata)
    if not (hasattr(sae, "W_dec_key") and hasattr(sae, "W_dec_value")):
        raise ValueError("dashboards need a factored WriteSAE (W_dec_key / W_dec_value); this SAE has neither "
                         f"({type(sae).__name__})")
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be [n_passages, n_pos] with both > 0, got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    d_vocab, cfg = model.cfg.d_vocab, model.cfg
    key_sums = torch.zeros(d_vocab, cfg.d_k, dtype=torch.float64)
    value_sums = torch.zeros(d_vocab, cfg.d_v, dtype=torch.float64)
    counts = torch.zeros(d_vocab, dtype=torch.int64)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    n_passages = tokens.shape[0]
    for start in tqdm(range(0, n_passages, batch_size), desc="scan for dashboards", disable=not progress):
        batch = tokens[start : start + batch_size]
        states, factors = head_states(model, batch, layer, head)  # [b, p, d_k * d_v]
        if not all_finite(states):
            raise ValueError("non-finite recurrent states in the scanned passages")
        codes = sae.encode(states.to(sae.device, sae.dtype)).float().cpu()  # [b, p, d_sae]
        b, t, f = (codes > 0).nonzero(as_tuple=True)
        parts.append((np.stack([(b + start).numpy(), t.numpy(), f.numpy()]).astype(np.int64), codes[b, t, f].numpy()))
        ids = batch.reshape(-1).cpu()
        key_sums.index_add_(0, ids, factors["k"].reshape(ids.numel(), -1).double().cpu())  # k: [b, p, d_k]
        value_sums.index_add_(0, ids, factors["v"].reshape(ids.numel(), -1).double().cpu())  # v: [b, p, d_v]
        counts.index_add_(0, ids, torch.ones_like(ids))
    index = np.concatenate([p[0] for p in parts], axis=1)
    values = np.concatenate([p[1] for p in parts]).astype(np.float32)
    return DashboardScan(layer, head, tokens.cpu().numpy().astype(np.int64), index[0], index[1], index[2], values,
                         key_sums, value_sums, counts)
