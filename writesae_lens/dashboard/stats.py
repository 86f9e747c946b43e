"""The numbers of an atom's dashboard, as pure functions of arrays (no model, no SAE).

Every function takes what the scan (``dashboard.scan``) or the SAE's factors give and returns a pandas table or a
small dict; ``dashboard.data`` calls them per atom. Conventions:

- a *firing* is a (passage, position) where the atom's code is > 0; the scan keeps them as parallel arrays sorted by
  (passage, position, feature);
- *top contexts* are the atom's firings with the largest codes (ties: scan order), each with a window of tokens and
  the atom's code at every token of the window (0 where it does not fire);
- *token alignment* of a factor ``f`` (p on the key axis, q on the value axis) with a token is the cosine of ``f``
  with the mean native key (or value) vector of that token over the scan; for a rank-R atom (R > 1) it is the
  fraction of the mean vector's norm inside the span of the R factors (unsigned, in [0, 1]; for R = 1 it would be
  the absolute cosine);
- the *logit effect* is the paper's direct out-path ``<W_O[h] q, W_U[:, tok]>`` (``evaluation.logit_shift``): the
  shift of token tok's logit at a later read per unit ``eps * G * <p, q_t>``; the measured shift has the sign of
  ``<p, q_t>`` on top of it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor


def atom_firings(feature: np.ndarray, atom: int) -> np.ndarray:
    """Indices (into the scan's arrays) of the firings of ``atom``, in scan order."""
    return np.flatnonzero(feature == atom)


def top_firings(code: np.ndarray, rows: np.ndarray, n_top: int) -> np.ndarray:
    """The ``n_top`` of ``rows`` (indices into ``code``) with the largest codes, largest first; ties keep scan
    order (a stable sort on the negated code)."""
    order = np.argsort(-code[rows], kind="stable")
    return rows[order[:n_top]]


def atom_code_grid(passage: np.ndarray, position: np.ndarray, code: np.ndarray, rows: np.ndarray,
                   n_passages: int, n_pos: int) -> np.ndarray:
    """``[n_passages, n_pos]`` codes of one atom (0 where it does not fire), from its firing ``rows``."""
    grid = np.zeros((n_passages, n_pos), dtype=np.float32)
    grid[passage[rows], position[rows]] = code[rows]
    return grid


def top_contexts(tokens: np.ndarray, grid: np.ndarray, passage: np.ndarray, position: np.ndarray,
                 code: np.ndarray, top: np.ndarray, left: int, right: int) -> pd.DataFrame:
    """One row per top firing (``top``: indices into the scan arrays, best first): ``rank``, ``passage``,
    ``position``, ``code``, ``token`` (the id at the firing) and the window ``context_tokens`` (ids) /
    ``context_codes`` (the atom's code at each) from ``position - left`` to ``position + right`` clipped to the
    passage, with ``focus`` the index of the firing inside the window."""
    n_pos = tokens.shape[1]
    rows = []
    for rank, i in enumerate(top.tolist()):
        b, t = int(passage[i]), int(position[i])
        lo, hi = max(0, t - left), min(n_pos, t + right + 1)
        rows.append({"rank": rank, "passage": b, "position": t, "code": float(code[i]), "token": int(tokens[b, t]),
                     "context_tokens": tokens[b, lo:hi].tolist(), "context_codes": grid[b, lo:hi].tolist(),
                     "focus": t - lo})
    columns = ["rank", "passage", "position", "code", "token", "context_tokens", "context_codes", "focus"]
    return pd.DataFrame(rows, columns=columns)


def activation_summary(codes: np.ndarray, n_positions: int, bins: int = 30) -> dict:
    """Density (firings / scanned positions), the code's max / mean / median over firings, and a histogram of the
    non-zero codes: ``counts`` [bins], ``edges`` [bins + 1], ``centers`` [bins] (empty when it never fires)."""
    codes = np.asarray(codes, dtype=np.float64)
    n = int(codes.size)
    summary = {"n_firings": n, "n_positions": int(n_positions), "density": n / n_positions if n_positions else 0.0,
               "max": float(codes.max()) if n else 0.0, "mean": float(codes.mean()) if n else 0.0,
               "median": float(np.median(codes)) if n else 0.0}
    if n:
        counts, edges = np.histogram(codes, bins=bins)
    else:
        counts, edges = np.zeros(0, dtype=np.int64), np.zeros(0)
    summary.update(counts=counts.tolist(), edges=edges.tolist(), centers=((edges[:-1] + edges[1:]) / 2).tolist())
    return summary


def token_means(sums: Float[Tensor, "d_vocab d"], counts: Tensor, min_count: int) -> tuple[Tensor, Tensor]:
    """The mean vector of each token seen at least ``min_count`` times: (token ids [n], means [n, d])."""
    seen = torch.nonzero(counts >= min_count).flatten()
    return seen, sums[seen] / counts[seen, None].to(sums)


def factor_alignment(factors: Float[Tensor, "rank d"], vectors: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
    """Rank 1: the signed cosine of each vector with the factor. Rank R > 1: ``||P v|| / ||v||`` with P the
    orthogonal projection onto the span of the R factors. Zero vectors give 0."""
    factors, vectors = factors.double(), vectors.double()
    norms = vectors.norm(dim=-1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    if factors.shape[0] == 1:
        f = factors[0]
        return ((vectors @ f) / (safe * f.norm().clamp_min(1e-300))) * (norms > 0)
    basis = torch.linalg.qr(factors.T).Q  # [d, R] orthonormal
    return (vectors @ basis).norm(dim=-1) / safe * (norms > 0)


def aligned_tokens(token_ids: Tensor, counts: Tensor, scores: Tensor, n: int, signed: bool) -> pd.DataFrame:
    """The ``n`` tokens with the highest scores and, when ``signed``, the ``n`` with the lowest: columns
    ``side`` ("top" / "bottom"), ``rank``, ``token``, ``count`` (occurrences in the scan), ``score``."""
    scores = scores.double().cpu()
    order = torch.argsort(scores, descending=True, stable=True)
    sides = [("top", order[:n])]
    if signed:
        sides.append(("bottom", torch.argsort(scores, stable=True)[:n]))
    rows = [{"side": side, "rank": r, "token": int(token_ids[i]), "count": int(counts[token_ids[i]]),
             "score": float(scores[i])} for side, idx in sides for r, i in enumerate(idx.tolist())]
    return pd.DataFrame(rows, columns=["side", "rank", "token", "count", "score"])


def logit_effects(out_path: Float[Tensor, "rank d_vocab"], n: int) -> pd.DataFrame:
    """Per rank component, the ``n`` tokens the out-path raises most (``side`` "promoted") and lowers most
    ("suppressed"): columns ``component``, ``side``, ``rank``, ``token``, ``effect``."""
    rows = []
    out_path = out_path.double().cpu()
    for component, row in enumerate(out_path):
        k = min(n, row.numel())
        for side, (values, indices) in (("promoted", row.topk(k)), ("suppressed", (-row).topk(k))):
            sign = 1.0 if side == "promoted" else -1.0
            rows += [{"component": component, "side": side, "rank": r, "token": int(t), "effect": sign * float(v)}
                     for r, (v, t) in enumerate(zip(values.tolist(), indices.tolist()))]
    return pd.DataFrame(rows, columns=["component", "side", "rank", "token", "effect"])


def histogram(values: np.ndarray, bins: int = 30) -> dict:
    """``counts`` / ``edges`` / ``centers`` of ``values`` (e.g. one atom's out-path over the vocabulary)."""
    counts, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)
    return {"counts": counts.tolist(), "edges": edges.tolist(), "centers": ((edges[:-1] + edges[1:]) / 2).tolist()}


def win_rates(records: pd.DataFrame) -> pd.DataFrame:
    """Per substituted atom of a substitution run's records: ``n`` firings, ``wins`` (KL_atom < KL_delete, ties
    lose, as ``evaluation.stats.win_indicator``), ``win_rate`` and its Wilson 95 % interval ``low`` / ``high``."""
    from ..evaluation.stats import proportion, win_indicator

    rows = []
    for atom, group in records.groupby("atom", sort=True):
        p = proportion(win_indicator(group["kl_atom"].to_numpy(), group["kl_delete"].to_numpy()))
        rows.append({"atom": int(atom), "n": p.n, "wins": p.successes, "win_rate": p.rate, "low": p.low,
                     "high": p.high})
    return pd.DataFrame(rows, columns=["atom", "n", "wins", "win_rate", "low", "high"])
