"""Padding: rows of different lengths in one batch, with the pads contributing nothing.

``forward(tokens, attention_mask=mask)`` takes ``mask`` [batch, pos] (1 = real token, 0 = pad), as TransformerLens
does. Two layouts are accepted:

- **Left padding** (every row's pads before its first real token, as ``to_tokens(..., padding_side="left")`` makes),
  on a call that starts a sequence (no cache, or an empty one). The forward pass puts the pad mask of the call in each
  layer's cache entry (``layer_cache["pad"]`` [batch, pos] bool) and the layers read it:

  - recurrent mixers (``MatrixWriteMixer.recur_with_cache``): at a pad the write strength, the log decay and the
    family's extra transition factors are zero, so the write is zero and the transition the identity;
  - the causal convolutions (``conv.causal_conv``) and RWKV-7's token shift see zeros at the pads, as a row alone
    sees before its first token;
  - attention layers mask the pads' keys (each pad query sees only its own key, so no row of the softmax is empty),
    and rotary positions count from each row's first real token (``cache.positions`` starts at minus the pad count).

  So every real position's output, and the cache left behind, equal those of the row run alone. The decoding steps
  after it need no mask.
- **Right padding** (every row's pads after its last real token), without a cache. Every layer is causal, so the
  pads, coming last, change nothing at the real positions: the run needs no mask inside the layers. It is refused
  with a cache, which would be left holding the pads' writes (each row's state must stop at its own last token):
  pad on the left to continue or generate.

Pads anywhere else (inside a row), and pads on a call that continues a cache, are refused. The loss excludes pads
(``masked_next_token_loss``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def checked_real_mask(attention_mask, shape: tuple[int, ...] | None) -> Tensor | None:
    """The mask [batch, pos] as bool (True at real tokens) after checking it; None when nothing is padded."""
    if attention_mask is None:
        return None
    mask = torch.as_tensor(attention_mask)
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; it must match the input's [batch, pos] = "
                         f"{tuple(shape)}")
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, pos]; got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (pad) and 1 (real token)")
    real = mask.bool()
    if bool(real.all()):
        return None
    if not bool(real.any(1).all()):
        empty = (~real.any(1)).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {empty} hold no real token")
    return real


def padding_layout(real: Tensor) -> Literal["left", "right"]:
    """Which side a checked mask pads; a clear error for pads inside a row or on both sides of one batch."""
    starts_real = bool((real[:, :-1] <= real[:, 1:]).all())  # 0...0 1...1 in every row
    ends_real = bool((real[:, :-1] >= real[:, 1:]).all())  # 1...1 0...0 in every row
    if starts_real:
        return "left"
    if ends_real:
        return "right"
    raise ValueError("attention_mask must pad every row on the same side: left padding (pads before each row's first "
                     "real token) or right padding (pads after its last one); pads inside a row are not supported")


def pad_mask_for_call(attention_mask, shape, cache, device=None) -> Tensor | None:
    """The pad mask [batch, pos] (True at pads) the layers must see for this call, or None: left padding gives its
    pads (on a call that starts a sequence); right padding without a cache gives None (causality makes the layers
    ignore trailing pads). The mask is moved to ``device`` (the input's)."""
    real = checked_real_mask(attention_mask, shape)
    if real is None:
        return None
    continuing = cache is not None and (cache.seq_len != 0 or cache.positions is not None)
    if padding_layout(real) == "right":
        if cache is not None:
            raise ValueError("right padding cannot be used with a cache: the cache would end with the pads' writes "
                             "instead of each row's last token. Pad on the left (padding_side='left') to continue "
                             "or generate")
        return None
    if continuing:
        raise ValueError("padding is accepted only on a call that starts a sequence (an empty cache): the decoding "
                         "steps after a padded prompt need no attention_mask")
    return ~real.to(device) if device is not None else ~real


def masked_next_token_loss(logits: Tensor, tokens: Tensor, attention_mask=None, per_token: bool = False) -> Tensor:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]`` (fp32). With ``attention_mask``
    [batch, pos] only pairs whose position and next position are both real count: the mean is over those pairs, and
    per token (``[batch, pos - 1]``) the other entries are 0, as TransformerLens' ``loss_fn`` does."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)  # [batch, pos - 1]
    if attention_mask is None:
        return nll if per_token else nll.mean()
    real = torch.as_tensor(attention_mask, device=nll.device).bool()
    if tuple(real.shape) != tuple(tokens.shape):
        raise ValueError(f"attention_mask has shape {tuple(real.shape)}; the tokens are {tuple(tokens.shape)}")
    counted = real[:, :-1] & real[:, 1:]  # [batch, pos - 1]
    nll = nll * counted
    if per_token:
        return nll
    if not bool(counted.any()):
        raise ValueError("the attention_mask leaves no pair of consecutive real tokens to compute a loss on")
    return nll.sum() / counted.sum()


def pad_mask(layer_cache: dict | None) -> Tensor | None:
    """The pad mask [batch, pos] (True at pads) of the current call, or None."""
    return layer_cache.get("pad") if layer_cache is not None else None
