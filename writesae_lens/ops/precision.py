"""The precision the recurrences and norms compute in: float32 for half, bfloat16 and float32 models (the kernels'
accumulation precision), float64 for a float64 model (so that exactness checks can run in float64 end to end)."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """``x`` in the compute precision: float64 stays float64, every other dtype becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def compute_dtype(x: Tensor) -> torch.dtype:
    """The compute precision of a tensor (see ``upcast``)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
