"""The closed-form logit shift of a state perturbation, as pure functions (paper section 2 and appendix A).

Perturb one head's state after the write at t0 by ``eps * A`` with ``A = p q^T`` (an atom: ``p`` on the key axis
``d_k``, ``q`` on the value axis ``d_v``). Every later state sees it through the transitions; dropping the delta
rule's erase term, the perturbation at t = t0 + h is ``eps * G * A`` with the gain

    G = prod_{s = t0+1}^{t} a_s = exp(sum_{s = t0+1}^{t} g_s)          (h = 0: G = 1)

(``g_s`` the log decay of ``hook_decay``; per key channel for RWKV-7, where G is then a diagonal on the key axis).
The read at t, ``o_t = S_t^T q_t``, changes by ``eps * <G p, q_t> * q`` and the paper sends that straight to the
logits through the head's block of the output projection, ignoring the gated norm and every later layer:

    shift[tok] = eps * <G p, q_t> * <W_O[h] q, W_U[:, tok]>

Decision on the out-path (the paper writes ``<v_i, W_U[tok]>``, which cannot be taken as written: ``v_i`` lives on
the key axis): the value-side factor ``q`` goes through ``W_O[h]`` (``[d_model, d_v]``, the columns of the mixer's
output projection that head h's reads feed) and is dotted with the unembedding columns ``W_U`` (``[d_model,
d_vocab]``); no norm weight, no gate, no final norm (they are what the fitted scale of the second reading absorbs).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float
from torch import Tensor


def decay_gain(log_decay: Float[Tensor, "*rows horizon"] | Float[Tensor, "*rows horizon d_k"],
               channel_axis: bool = False) -> Tensor:
    """``G = exp(sum_s g_s)`` over the positions t0+1..t given as the horizon axis (the last axis, or the one before
    the key-channel axis with ``channel_axis``). An empty horizon (h = 0) gives 1."""
    return log_decay.sum(dim=-2 if channel_axis else -1).exp()


def head_output_matrix(mixer, head: int) -> Float[Tensor, "d_model d_v"]:
    """``W_O[h]``: the columns of the mixer's output projection that head ``head``'s reads feed."""
    weight = mixer.output_projection.weight  # [d_model, n_heads * d_v]
    d_v = weight.shape[1] // mixer.cfg.n_heads
    return weight[:, head * d_v : (head + 1) * d_v]


def out_path_logits(w_o: Float[Tensor, "d_model d_v"], w_u: Float[Tensor, "d_model d_vocab"],
                    value_factors: Float[Tensor, "*atoms d_v"]) -> Float[Tensor, "*atoms d_vocab"]:
    """``<W_O[h] q, W_U[:, tok]>`` for every token: the paper's direct out-path of a value-side factor ``q``."""
    return (value_factors.to(w_o) @ w_o.T) @ w_u.to(w_o)


def key_alignment(key_factors: Float[Tensor, "*#rows d_k"], query: Float[Tensor, "*#rows d_k"],
                  gain: Tensor) -> Tensor:
    """``<G p, q_t>``: the key-side factor, through the gain (a scalar per row, or per key channel), against the
    query of the read at t."""
    if gain.dim() == key_factors.dim():  # per key channel
        return (gain * key_factors * query).sum(-1)
    return gain * (key_factors * query).sum(-1)


def paper_prediction(eps: Tensor, alignment: Tensor, out_path: Tensor) -> Tensor:
    """``eps * <G p, q_t> * <W_O[h] q, W_U[tok]>``, broadcast over whatever axes the arguments share."""
    return eps * alignment * out_path


# ---- the audit's statistics ------------------------------------------------------------------------------------------

def r_squared(measured: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """``1 - SS_res / SS_tot`` of ``measured`` against the parameter-free ``predicted`` (no scale, no intercept fitted;
    it can be negative). NaN where the measured values do not vary."""
    measured, predicted = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    residual = ((measured - predicted) ** 2).sum(axis)
    total = ((measured - measured.mean(axis, keepdims=True)) ** 2).sum(axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), np.nan)


def r_squared_fitted(measured: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """R^2 of the least-squares fit ``measured ~ a * predicted + b`` (one scale per cell, with intercept): the squared
    Pearson correlation. NaN where either side does not vary."""
    measured, predicted = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    dm = measured - measured.mean(axis, keepdims=True)
    dp = predicted - predicted.mean(axis, keepdims=True)
    numerator = (dm * dp).sum(axis) ** 2
    denominator = (dm**2).sum(axis) * (dp**2).sum(axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), np.nan)


def fitted_scale(measured: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """The least-squares scale through the origin, ``sum(m p) / sum(p^2)``: the fitted G of the second reading."""
    measured, predicted = np.asarray(measured, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    denominator = (predicted**2).sum(axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, (measured * predicted).sum(axis) / np.where(denominator > 0, denominator, 1.0),
                        np.nan)


def top_k_overlap(shift_a: Tensor, shift_b: Tensor, k: int) -> Tensor:
    """``|TopK(a) & TopK(b)| / K`` per row of two ``[rows, d_vocab]`` logit shifts (the tokens each raises most)."""
    top_a = shift_a.topk(k, dim=-1).indices
    top_b = shift_b.topk(k, dim=-1).indices
    shared = (top_a[:, :, None] == top_b[:, None, :]).any(-1).sum(-1)
    return shared.double() / k
