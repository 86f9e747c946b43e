"""How far apart two tensors are, as the parity and hook tests report it."""

import torch


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference| (the reference's scale; 1e-12 when it is all zeros)."""
    return ((ours - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
