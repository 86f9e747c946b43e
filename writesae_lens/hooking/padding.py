"""Left padding: rows of different lengths in one batch, with the pads contributing nothing.

``forward(tokens, attention_mask=mask)`` takes ``mask`` [batch, pos] (1 = real token, 0 = pad) with every row's pads
first (left padding, as ``to_tokens(..., padding_side="left")`` makes). The forward pass puts the pad mask of the call
in each layer's cache entry (``layer_cache["pad"]`` [batch, pos] bool) and the layers read it:

- recurrent mixers (``MatrixWriteMixer.recur_with_cache``): at a pad the write strength, the log decay and the
  family's extra transition factors are zero, so the write is zero and the transition the identity;
- the causal convolutions (``conv.causal_conv``) and RWKV-7's token shift see zeros at the pads, as a row alone sees
  before its first token;
- attention layers mask the pads' keys (each pad query sees only its own key, so no row of the softmax is empty),
  and rotary positions count from each row's first real token (``cache.positions`` starts at minus the pad count).

So every real position's output, and the cache left behind, equal those of the row run alone. Padding is accepted
only on a call that starts a sequence (an empty cache); the decoding steps after it need no mask.
"""

from __future__ import annotations

import torch
from torch import Tensor


def left_padding(attention_mask, tokens: Tensor | None, cache, return_type, loss_per_token: bool) -> Tensor | None:
    """The pad mask [batch, pos] (True at pads) of a checked ``attention_mask``; None when nothing is padded."""
    if attention_mask is None:
        return None
    mask = torch.as_tensor(attention_mask)
    if tokens is not None and tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; it must match the input's [batch, pos] = "
                         f"{tuple(tokens.shape[:2])}")
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, pos]; got shape {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (pad) and 1 (real token)")
    elif mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (pad) and 1 (real token)")
    real = mask.bool()
    if bool(real.all()):
        return None
    if not bool(real.any(1).all()):
        empty = (~real.any(1)).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {empty} hold no real token")
    if bool((real[:, :-1] & ~real[:, 1:]).any()):
        raise ValueError("attention_mask must be left padding (each row's pads before its first real token); "
                         "tokenize with padding_side='left'")
    if cache is not None and (cache.seq_len != 0 or cache.positions is not None):
        raise ValueError("padding is accepted only on a call that starts a sequence (an empty cache): the decoding "
                         "steps after a padded prompt need no attention_mask")
    if return_type in ("loss", "both") and not loss_per_token:
        raise ValueError("a mean loss over padded rows would count the pads: pass loss_per_token=True and mask it")
    device = tokens.device if tokens is not None else mask.device
    return ~real.to(device)


def pad_mask(layer_cache: dict | None) -> Tensor | None:
    """The pad mask [batch, pos] (True at pads) of the current call, or None."""
    return layer_cache.get("pad") if layer_cache is not None else None
