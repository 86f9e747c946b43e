"""Whether a tensor holds only finite values, cheaply."""

from __future__ import annotations

import torch
from torch import Tensor


def all_finite(x: Tensor) -> bool:
    """True when every entry of ``x`` is finite.

    Fast path: a finite sum means every entry is finite (a NaN or an infinity makes the sum NaN or infinite), and a
    plain sum is one cheap pass without the boolean temporary of ``torch.isfinite(x).all()``. A non-finite sum may
    also be an overflow of large finite entries, so that case is settled entry by entry."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
