"""Attention products with grouped KV heads, and with cached keys that several batch rows share.

Query head ``h`` reads KV head ``h // repeat``. Folding the ``repeat`` query heads of a KV head into the query axis
turns each product into one matmul per KV head, with no copy of the keys for each query head.

Rows that continue one cached sequence (the substitution test runs many edited continuations of one passage) need
not copy its keys: a *shared* key tensor ``[n_sources, kv_head, key_pos, d_head]`` with ``source[b]`` naming the
sequence row ``b`` reads. Rows of one source are folded into the query axis as well, so the keys are read in place.

Reference (what every function equals):

    scores[b, g, r, i, j] = q[b, g, r, i] . keys[source[b], g, j]
    mixed[b, g, r, i]     = sum_j pattern[b, g, r, i, j] * values[source[b], g, j]

with ``source[b] = b`` when ``source`` is None.
"""

from __future__ import annotations

from torch import Tensor


def grouped_scores(
    q: Tensor,  # [batch, kv_head, repeat, q_pos, d_head]
    keys: Tensor,  # [batch or n_sources, kv_head, key_pos, d_head]
    source: Tensor | None = None,  # [batch] long: the key row each batch row reads; None: its own
) -> Tensor:  # [batch, kv_head, repeat, q_pos, key_pos]
    return _fold_product(q, keys.transpose(-1, -2), source)


def grouped_mix(
    pattern: Tensor,  # [batch, kv_head, repeat, q_pos, key_pos]
    values: Tensor,  # [batch or n_sources, kv_head, key_pos, d_head]
    source: Tensor | None = None,  # [batch] long
) -> Tensor:  # [batch, kv_head, repeat, q_pos, d_head]
    return _fold_product(pattern, values, source)


def _fold_product(left: Tensor, right: Tensor, source: Tensor | None) -> Tensor:
    """``left[b, g, r, i, :] @ right[source[b], g]`` for every b, g, r, i (shapes as in the public functions)."""
    batch, kv, repeat, n_q, inner = left.shape
    n_out = right.shape[-1]
    if source is None:  # each row its own keys: fold the repeat axis into the query axis
        return (left.reshape(batch, kv, repeat * n_q, inner) @ right).reshape(batch, kv, repeat, n_q, n_out)
    out = left.new_empty(batch, kv, repeat, n_q, n_out)
    for s in source.unique().tolist():
        rows = (source == s).nonzero().squeeze(-1)
        part = left[rows] if len(rows) < batch else left
        folded = part.transpose(0, 1).reshape(kv, len(rows) * repeat * n_q, inner)  # [kv, rows*repeat*q, inner]
        product = (folded @ right[s]).reshape(kv, len(rows), repeat, n_q, n_out).transpose(0, 1)
        if len(rows) == batch:
            return product
        out[rows] = product
    return out
