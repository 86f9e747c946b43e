"""The value-side direction that raises one token's logit through one head (paper section 6.2):

    v_T* = W_O[h]^T W_U[T] / |W_O[h]^T W_U[T]|          (unit, in R^{d_v})

``W_O[h]`` is the ``[d_model, d_v]`` column block of head h in the mixer's output projection and ``W_U[T]`` the
unembedding column of token T. A rank-1 state edit ``u v_T*^T`` moves the head's read along ``v_T*`` by ``<u, q>``,
which the output projection maps onto the residual direction most aligned with ``W_U[T]`` (the gated per-head norm
in between is ignored here, as in the paper). The closed-form analyses import these functions.
"""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor

from ..evaluation.logit_shift import head_output_matrix
from ..ops.precision import upcast

def value_directions(
    head_output: Float[Tensor, "d_model d_v"],
    unembedding: Float[Tensor, "d_model n"],
) -> tuple[Float[Tensor, "n d_v"], Float[Tensor, " n"]]:
    """``(v_T*, |W_O[h]^T W_U[T]|)`` for each unembedding column: the unit directions and their norms (float32, or
    float64 for float64 weights)."""
    raw = (upcast(head_output).T @ upcast(unembedding)).T  # [n, d_v]
    norms = raw.norm(dim=-1)
    return raw / norms.clamp_min(1e-30)[:, None], norms


def head_output_block(model, layer: int, head: int) -> Float[Tensor, "d_model d_v"]:
    """``W_O[h]``: the columns of head ``head``'s read in layer ``layer``'s mixer output projection
    (``evaluation.logit_shift.head_output_matrix``), with clear errors for a layer or head that has none."""
    block = model.blocks[layer]
    if not hasattr(block, "mixer"):
        recurrent = [i for i, b in enumerate(model.blocks) if hasattr(b, "mixer")]
        raise ValueError(f"layer {layer} is not a recurrent layer; recurrent layers: {recurrent}")
    n_heads = model.cfg.n_heads
    if not 0 <= head < n_heads:
        raise ValueError(f"head {head} is out of range; valid heads are 0..{n_heads - 1}")
    return head_output_matrix(block.mixer, head).detach()


def target_directions(model, layer: int, head: int, tokens: Int[Tensor, " n"]) -> tuple[Tensor, Tensor]:
    """``v_T*`` [n, d_v] and the norms [n] for token ids ``tokens`` through head ``head`` of ``layer``."""
    check_token_ids(tokens, model.cfg.d_vocab)
    unembedding = model.W_U.detach()[:, tokens.to(model.W_U.device)]  # [d_model, n]
    return value_directions(head_output_block(model, layer, head), unembedding)


def check_token_ids(tokens: Tensor, d_vocab: int) -> None:
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab):
        bad = [t for t in tokens.tolist() if not 0 <= t < d_vocab]
        raise ValueError(f"target tokens {bad} lie outside the vocabulary (valid ids 0..{d_vocab - 1})")
