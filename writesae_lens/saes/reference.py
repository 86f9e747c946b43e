"""Readable references for the WriteSAE math, written as the paper writes it (slow; for tests).

The fast code in `factored.py` must agree with these on outputs and gradients.
"""


import torch
from jaxtyping import Float
from torch import Tensor


def reference_bilinear_preactivations(
    states: Float[Tensor, "n d_k d_v"],
    key_factors: Float[Tensor, "d_sae rank d_k"],
    value_factors: Float[Tensor, "d_sae rank d_v"],
    b_enc: Float[Tensor, " d_sae"],
) -> Float[Tensor, "n d_sae"]:
    """Matched-filter pre-activation z_i = sum_r u_{i,r}^T X w_{i,r} + b_i for every state X."""
    return torch.einsum("frk,nkv,frv->nf", key_factors, states, value_factors) + b_enc


def reference_decode(
    code: Float[Tensor, "n d_sae"],
    key_factors: Float[Tensor, "d_sae rank d_k"],
    value_factors: Float[Tensor, "d_sae rank d_v"],
    bias_matrix: Float[Tensor, "d_k d_v"],
) -> Float[Tensor, "n d_k d_v"]:
    """X_hat = sum_i a_i sum_r p_{i,r} q_{i,r}^T + B, summing over every atom."""
    return torch.einsum("nf,frk,frv->nkv", code, key_factors, value_factors) + bias_matrix


def reference_topk(preactivations: Float[Tensor, "n d_sae"], k: int) -> Float[Tensor, "n d_sae"]:
    """Keep the k largest pre-activations of each row, ReLU them, zero the rest."""
    values, indices = preactivations.topk(k, dim=-1)
    return torch.zeros_like(preactivations).scatter(-1, indices, values.relu())


def reference_batch_topk(
    preactivations: Float[Tensor, "n d_sae"], k: int
) -> Float[Tensor, "n d_sae"]:
    """ReLU everything, then keep the k * n largest entries of the whole batch."""
    flat = preactivations.relu().flatten()
    values, indices = flat.topk(k * preactivations.shape[0])
    return torch.zeros_like(flat).scatter(-1, indices, values).reshape(preactivations.shape)
