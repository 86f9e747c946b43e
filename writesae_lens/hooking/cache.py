"""The recurrent cache carried between forward calls (generation, continuing a prefix)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RecurrentCache:
    """Per-layer state after ``seq_len`` tokens.

    ``layers[l]`` is a dict owned by block ``l``: a recurrent layer keeps ``{"conv": [batch, channels, kernel - 1],
    "state": [batch, head, d_k, d_v]}``, an attention layer ``{"k": ..., "v": ...}`` ([batch, kv_head, pos, d_head]).
    Blocks replace the tensors in their dict and never write into them in place, so ``copy()`` (which copies the
    dicts, not the tensors) is enough to branch a cache into several continuations.
    """

    layers: list[dict[str, Tensor]] = field(default_factory=list)
    seq_len: int = 0

    @staticmethod
    def empty(n_layers: int) -> "RecurrentCache":
        return RecurrentCache([{} for _ in range(n_layers)], 0)

    def copy(self) -> "RecurrentCache":
        return RecurrentCache([dict(layer) for layer in self.layers], self.seq_len)

    def select(self, rows: Tensor | list[int]) -> "RecurrentCache":
        """The cache of some batch rows (index along dim 0 of every tensor)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return RecurrentCache(
            [{name: t[rows.to(t.device)] for name, t in layer.items()} for layer in self.layers], self.seq_len
        )

    def recurrent_state(self, layer: int) -> Tensor:
        """The matrix state ``[batch, head, d_k, d_v]`` of a recurrent layer."""
        try:
            return self.layers[layer]["state"]
        except (IndexError, KeyError):
            raise KeyError(f"layer {layer} holds no recurrent state in this cache (is it a recurrent layer?)") from None
