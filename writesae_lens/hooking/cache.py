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
    # Rows of a batched cache may sit at different positions: then ``positions[b]`` is row b's length and attention
    # layers keep a ``"valid"`` mask [batch, key_pos] over their keys (see ``rows_from_snapshots``).
    positions: Tensor | None = None

    @staticmethod
    def empty(n_layers: int) -> "RecurrentCache":
        return RecurrentCache([{} for _ in range(n_layers)], 0)

    def copy(self) -> "RecurrentCache":
        return RecurrentCache([dict(layer) for layer in self.layers], self.seq_len, self.positions)

    def advance(self, n_pos: int) -> None:
        self.seq_len += n_pos
        if self.positions is not None:
            self.positions = self.positions + n_pos

    def offsets(self):
        """The position of the next token: an int, or a [batch] tensor for a batched cache."""
        return self.seq_len if self.positions is None else self.positions

    def select(self, rows: Tensor | list[int]) -> "RecurrentCache":
        """The cache of some batch rows (index along dim 0 of every tensor)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        positions = self.positions[rows.to(self.positions.device)] if self.positions is not None else None
        return RecurrentCache(
            [{name: t[rows.to(t.device)] for name, t in layer.items()} for layer in self.layers], self.seq_len, positions
        )

    def request_snapshots(self, positions, layers) -> None:
        """Ask the next forward call to keep, for each position s (counted from the start of that call, 0..n_pos),
        the cache as it was after the call's first s tokens, in the given layers (a batch-1 call). Read them back
        with ``rows_from_snapshots``. Recurrent layers store only those states; attention layers keep their keys."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        for layer in layers:
            self.layers[layer]["snapshot_at"] = positions

    def rows_from_snapshots(self, which: Tensor) -> "RecurrentCache":
        """A batched cache whose row r is snapshot ``which[r]`` (an index into the requested positions): the state
        after the first ``positions[which[r]]`` tokens. Rows sit at different positions (``positions`` per row)."""
        which = torch.as_tensor(which, dtype=torch.long)
        layers, lengths = [], None
        for layer in self.layers:
            if "snapshots" in layer:
                snaps = layer["snapshots"]
                layers.append({name: t[0, which.to(t.device)] for name, t in snaps.items()})
                lengths = layer["snapshot_at"][which] + self.seq_len - layer["snapshot_len"]
            else:
                layers.append({})
        if lengths is None:
            raise ValueError("this cache holds no snapshots: call request_snapshots before the forward pass")
        longest = int(lengths.max())
        for layer, new in zip(self.layers, layers):
            if "k" in layer and "snapshots" not in layer:
                rows = len(which)
                new["k"] = layer["k"][:, :, :longest].expand(rows, -1, -1, -1)
                new["v"] = layer["v"][:, :, :longest].expand(rows, -1, -1, -1)
                new["valid"] = torch.arange(longest, device=layer["k"].device)[None, :] < lengths.to(layer["k"].device)[:, None]
        return RecurrentCache(layers, longest, lengths)

    def recurrent_state(self, layer: int) -> Tensor:
        """The matrix state ``[batch, head, d_k, d_v]`` of a recurrent layer."""
        try:
            return self.layers[layer]["state"]
        except (IndexError, KeyError):
            raise KeyError(f"layer {layer} holds no recurrent state in this cache (is it a recurrent layer?)") from None

