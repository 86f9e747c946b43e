"""The depthwise causal convolution in front of the recurrent mixers (Gated DeltaNet, Mamba-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.gated_delta import at_positions
from .padding import pad_mask


def causal_conv(
    projected: Tensor,  # [batch, pos, channels]
    weight: Tensor,  # [channels, 1, kernel]
    bias: Tensor | None,  # [channels]
    layer_cache: dict | None,
) -> Tensor:  # [batch, pos, channels]
    """Depthwise causal conv + SiLU. The last ``kernel - 1`` inputs are carried in ``layer_cache["conv"]``
    ([batch, channels, kernel - 1]); the entry is replaced, never written in place. When the cache requests snapshots
    (``"snapshot_at"``, see ``RecurrentCache.request_snapshots``) the inputs before each requested position are kept
    in ``layer_cache["snapshots"]["conv"]`` ([batch, n_sel, channels, kernel - 1]; positions [n_sel] or per row
    [batch, n_sel])."""
    batch, n_pos, channels = projected.shape
    width = weight.shape[-1] - 1
    history = layer_cache.get("conv") if layer_cache is not None else None
    if history is None:
        history = projected.new_zeros(batch, channels, width)
    pad = pad_mask(layer_cache)
    if pad is not None:  # left pads enter no window: a row sees zeros before its first token, as alone
        projected = projected.masked_fill(pad[..., None], 0.0)
    full = torch.cat([history.to(projected.dtype), projected.transpose(1, 2)], dim=-1)  # [batch, channels, K-1+pos]
    if layer_cache is not None:
        layer_cache["conv"] = full[..., full.shape[-1] - width :]
        if layer_cache.get("snapshot_at") is not None:
            at = layer_cache["snapshot_at"].to(full.device)  # [n_sel] or [batch, n_sel]
            window = at[..., None] + torch.arange(width, device=full.device)  # [..., n_sel, K-1]
            picked = at_positions(full.transpose(1, 2), window.flatten(-2))  # [batch, n_sel * (K-1), channels]
            layer_cache.setdefault("snapshots", {})["conv"] = picked.unflatten(1, window.shape[-2:]).transpose(-1, -2)
            layer_cache["snapshot_len"] = n_pos
    return F.silu(F.conv1d(full, weight, bias, groups=channels)).transpose(1, 2)
