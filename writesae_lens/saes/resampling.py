"""Pure functions for dead-atom resampling as the WriteSAE paper describes it (method spec 2.1).

A dead atom is re-seeded from a training state that the current model reconstructs badly:
states are drawn with probability proportional to their squared reconstruction error, and the
atom's factors are the state's leading singular vectors. The SAE method that applies this to its
parameters is `WriteTrainingSAEBase.resample_dead_atoms_`.
"""

import torch
from jaxtyping import Float, Int
from torch import Tensor

# New encoder filters start at this fraction of the mean norm of the alive ones (paper: 0.2).
RESAMPLED_ENCODER_NORM_FRACTION = 0.2


def draw_states_by_error(
    squared_errors: Float[Tensor, " n_states"],
    n_draws: int,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " n_draws"]:
    """Indices of n_draws states drawn with replacement, with probability proportional to error.

    Falls back to uniform draws when the errors sum to zero or are not finite.
    """
    generator_device = generator.device if generator is not None else torch.device("cpu")
    weights = squared_errors.detach().double().clamp(min=0.0).to(generator_device)
    total = weights.sum()
    if not torch.isfinite(total) or total <= 0:
        weights = torch.ones_like(weights)
    drawn = torch.multinomial(weights, n_draws, replacement=True, generator=generator)
    return drawn.to(squared_errors.device)


def leading_singular_factors(
    states: Float[Tensor, "n d_k d_v"], rank: int
) -> tuple[Float[Tensor, "n rank d_k"], Float[Tensor, "n rank d_v"]]:
    """Unit key-side / value-side factors from each state's top `rank` singular vectors.

    For X = U S V^T: key factor r = U[:, r] and value factor r = V[:, r]. Ranks beyond
    min(d_k, d_v) are left zero. Singular values are dropped: a rank-1 atom comes out with unit
    Frobenius norm, like the renormalised decoder.
    """
    n, d_k, d_v = states.shape
    left, _, right_t = torch.linalg.svd(states.float(), full_matrices=False)  # [n,d_k,s], [n,s,d_v]
    usable = min(rank, left.shape[-1])
    key_factors = states.new_zeros(n, rank, d_k)
    value_factors = states.new_zeros(n, rank, d_v)
    key_factors[:, :usable] = left[:, :, :usable].transpose(1, 2).to(states.dtype)
    value_factors[:, :usable] = right_t[:, :usable, :].to(states.dtype)
    return key_factors, value_factors


def resampled_encoder_norm(alive_filter_norms: Float[Tensor, " n_alive"]) -> float:
    """The norm given to a re-seeded encoder filter: 0.2 x the mean norm of the alive ones.

    With no alive latent left, 0.2 x 1.
    """
    if alive_filter_norms.numel() == 0:
        return RESAMPLED_ENCODER_NORM_FRACTION
    return RESAMPLED_ENCODER_NORM_FRACTION * float(alive_filter_norms.float().mean())
