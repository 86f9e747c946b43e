"""The recurrent cache carried between forward calls (generation, continuing a prefix)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

SHARED_KEYS = ("k", "v")  # with a "source" entry, these are [n_sources, ...]: rows index them through it
# A recurrent layer of rows built with ``rows_from_snapshots(..., shared_states=True)`` keeps "state_shared"
# [n_sources, head, d_k, d_v] and "state_source" [batch] instead of "state", and "state_edit" (head, [batch, d_k,
# d_v]) for the rows' edits; after a one-token call it keeps "state_spent" (``MatrixWriteMixer.recur_with_cache``).
SHARED_STATE_KEYS = ("state_shared", "state_source", "state_edit")
SPENT_MESSAGE = ("rows with shared snapshot states (rows_from_snapshots with shared_states=True) keep no state of their "
                 "own after their one-token step; build the rows with shared_states=False to read or continue their "
                 "states")


def keeps_shared_states(layer_cache: dict | None) -> bool:
    """Whether a layer's cache entry holds shared snapshot states (or is spent), not one state per row."""
    return layer_cache is not None and ("state_shared" in layer_cache or "state_spent" in layer_cache)


def give_rows_their_states(layer_cache: dict) -> None:
    """Replace a layer's shared snapshot states by one state per row (``"state"`` [rows, head, d_k, d_v]), with the
    rows' edits added, for a call that needs them; a spent entry raises."""
    if "state_spent" in layer_cache:
        raise ValueError(SPENT_MESSAGE)
    state = layer_cache.pop("state_shared")[layer_cache.pop("state_source")]  # a new tensor: the shared one is kept
    if "state_edit" in layer_cache:
        head, edit = layer_cache.pop("state_edit")
        state[:, head] += edit
    layer_cache["state"] = state


def mark_spent(layer_cache: dict) -> None:
    """After a one-token step read from shared states: no final state was computed, so the entry keeps none."""
    for name in SHARED_STATE_KEYS:
        layer_cache.pop(name, None)
    layer_cache["state_spent"] = True


@dataclass
class RecurrentCache:
    """Per-layer state after ``seq_len`` tokens.

    ``layers[l]`` is a dict owned by block ``l``: a recurrent layer keeps ``{"conv": [batch, channels, kernel - 1],
    "state": [batch, head, d_k, d_v]}``, an attention layer ``{"k": ..., "v": ...}`` ([batch, kv_head, pos, d_head]).
    Rows made from snapshots share their attention keys instead of copying them: then ``"k"``/``"v"`` are
    [n_sources, kv_head, pos, d_head], ``"source"`` [batch] names the one each row reads, ``"valid"`` [batch, pos]
    masks each row's keys, and the keys the rows add themselves go to ``"k_own"``/``"v_own"`` [batch, ...].
    Blocks replace the tensors in their dict and never write into them in place, so ``copy()`` (which copies the
    dicts, not the tensors) is enough to branch a cache into several continuations.
    """

    layers: list[dict[str, Tensor]] = field(default_factory=list)
    seq_len: int = 0
    # Rows of a batched cache may sit at different positions: then ``positions[b]`` is row b's length and attention
    # layers keep a ``"valid"`` mask [batch, key_pos] over their keys (see ``rows_from_snapshots``).
    positions: Tensor | None = None
    # A frozen cache is read but never updated: each forward call continues from a copy (TransformerLens' freeze()).
    frozen: bool = False

    @staticmethod
    def empty(n_layers: int) -> "RecurrentCache":
        return RecurrentCache([{} for _ in range(n_layers)], 0)

    def copy(self) -> "RecurrentCache":
        """An unfrozen branch of this cache (the dicts are copied, the tensors shared: blocks replace them)."""
        return RecurrentCache([dict(layer) for layer in self.layers], self.seq_len, self.positions)

    def freeze(self) -> None:
        """Keep this cache as it is: later forward calls continue from it without updating it."""
        self.frozen = True

    def unfreeze(self) -> None:
        """Let forward calls update this cache again."""
        self.frozen = False

    def advance(self, n_pos: int) -> None:
        self.seq_len += n_pos
        if self.positions is not None:
            self.positions = self.positions + n_pos

    def offsets(self):
        """The position of the next token: an int, or a [batch] tensor for a batched cache."""
        return self.seq_len if self.positions is None else self.positions

    def select(self, rows: Tensor | list[int]) -> "RecurrentCache":
        """The cache of some batch rows (index along dim 0 of every per-row tensor; shared keys stay shared)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        positions = self.positions[rows.to(self.positions.device)] if self.positions is not None else None
        layers = []
        for layer in self.layers:
            shared = "source" in layer
            layers.append({name: t if shared and name in SHARED_KEYS else t[rows.to(t.device)]
                           for name, t in layer.items()})
        return RecurrentCache(layers, self.seq_len, positions)

    def request_snapshots(self, positions, layers) -> None:
        """Ask the next forward call to keep, for each position s (counted from the start of that call, 0..n_pos),
        the cache as it was after the call's first s tokens, in the given layers. ``positions`` is ``[n_sel]`` (the
        same positions in every batch row) or ``[batch, n_sel]`` (each row its own; pad a short row by repeating one
        of its positions). Read them back with ``rows_from_snapshots``. Recurrent layers store only those states;
        attention layers keep their keys."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        if positions.dim() not in (1, 2):
            raise ValueError(f"snapshot positions must be [n_sel] or [batch, n_sel], got shape {tuple(positions.shape)}")
        for layer in layers:
            self.layers[layer]["snapshot_at"] = positions

    def rows_from_snapshots(self, which: Tensor, rows: Tensor | None = None,
                            shared_states: bool = False) -> "RecurrentCache":
        """A batched cache whose row r is snapshot ``which[r]`` (an index into the requested positions) of batch row
        ``rows[r]`` (default: row 0): the state after that row's first ``positions[which[r]]`` tokens. Rows sit at
        different positions (``positions`` per row) and read their batch row's attention keys in place.

        ``shared_states``: rows of one snapshot share its matrix states instead of each getting a copy (only the
        snapshots some row uses are kept). A one-token call then reads them without a state per row
        (``ops.shared_step``) and keeps no final state, so such a cache serves one call; a longer call, or one with
        hooks on a recurrent mixer, gives each row its state first (exact either way). ``add_to_state`` edits
        them."""
        which = torch.as_tensor(which, dtype=torch.long)
        rows = torch.zeros_like(which) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        layers, lengths = [], None
        for layer in self.layers:
            if "snapshots" in layer:
                snaps = layer["snapshots"]
                shared = shared_states and "state" in snaps
                layers.append({name: t[rows.to(t.device), which.to(t.device)] for name, t in snaps.items()
                               if not (shared and name == "state")})
                if shared:
                    states = snaps["state"]  # [batch, n_sel, head, d_k, d_v]
                    flat = (rows * states.shape[1] + which).to(states.device)
                    used, source = torch.unique(flat, return_inverse=True)
                    every = len(used) == states.shape[0] * states.shape[1]  # then no copy: all are used
                    layers[-1]["state_shared"] = states.flatten(0, 1) if every else states.flatten(0, 1)[used]
                    layers[-1]["state_source"] = source
                at = layer["snapshot_at"]
                at = at[which] if at.dim() == 1 else at[rows, which]
                lengths = at + self.seq_len - layer["snapshot_len"]
            else:
                layers.append({})
        if lengths is None:
            raise ValueError("this cache holds no snapshots: call request_snapshots before the forward pass")
        longest = int(lengths.max())
        # attention keys are read in place: only the batch rows used become sources (a view when they are adjacent)
        used, source = torch.unique(rows, return_inverse=True)
        first, last = int(used[0]), int(used[-1])
        adjacent = last - first + 1 == len(used)
        for layer, new in zip(self.layers, layers):
            if "k" in layer and "snapshots" not in layer:
                device = layer["k"].device
                for name in SHARED_KEYS:
                    keys = layer[name][:, :, :longest]
                    new[name] = keys[first : last + 1] if adjacent else keys[used.to(device)]
                new["source"] = source.to(device)
                new["valid"] = torch.arange(longest, device=device)[None, :] < lengths.to(device)[:, None]
        return RecurrentCache(layers, longest, lengths)

    @staticmethod
    def stack_rows(caches: list["RecurrentCache"]) -> "RecurrentCache":
        """One batched cache holding the rows of several ``rows_from_snapshots`` caches (e.g. of different
        passages), in order. Shared attention keys are stacked once per source, right-padded to the longest."""
        if len(caches) == 1:
            return caches[0]
        longest = max(c.seq_len for c in caches)
        layers = []
        for parts in zip(*(c.layers for c in caches)):
            if not parts[0]:
                layers.append({})
            elif "source" in parts[0]:
                if any("k_own" in part for part in parts):
                    raise ValueError("stack_rows takes caches fresh from rows_from_snapshots (no keys of their own)")
                pad = lambda t: F.pad(t, (0, 0, 0, longest - t.shape[2]))  # noqa: E731  [src, kv, pos, d]
                offsets = torch.tensor([0] + [p["k"].shape[0] for p in parts]).cumsum(0)
                layers.append({
                    "k": torch.cat([pad(p["k"]) for p in parts]),
                    "v": torch.cat([pad(p["v"]) for p in parts]),
                    "source": torch.cat([p["source"] + int(o) for p, o in zip(parts, offsets)]),
                    "valid": torch.cat([F.pad(p["valid"], (0, longest - p["valid"].shape[1])) for p in parts]),
                })
            elif "state_shared" in parts[0]:
                if any("state_edit" in part for part in parts):
                    raise ValueError("stack_rows takes caches fresh from rows_from_snapshots (no state edits)")
                offsets = torch.tensor([0] + [p["state_shared"].shape[0] for p in parts]).cumsum(0)
                kept = [name for name in parts[0] if name != "state_source"]
                layers.append({name: torch.cat([p[name] for p in parts]) for name in kept})
                layers[-1]["state_source"] = torch.cat([p["state_source"] + int(o) for p, o in zip(parts, offsets)])
            else:
                layers.append({name: torch.cat([p[name] for p in parts]) for name in parts[0]})
        return RecurrentCache(layers, longest, torch.cat([c.offsets() for c in caches]))

    def add_to_state(self, layer: int, head: int, matrices: Tensor) -> None:
        """Add ``matrices`` [batch, d_k, d_v] to head ``head``'s state of every row of a recurrent layer. Rows with
        shared states (``rows_from_snapshots(shared_states=True)``) keep the edit beside the shared states; otherwise
        the state is replaced by the sum (never written in place: another cache may hold the same tensor)."""
        entry = self.layers[layer]
        if "state_shared" in entry:
            if "state_edit" in entry and entry["state_edit"][0] != head:
                raise ValueError(f"rows with shared states take edits of one head; layer {layer} already has "
                                 f"edits of head {entry['state_edit'][0]}")
            before = entry["state_edit"][1] if "state_edit" in entry else 0
            entry["state_edit"] = (head, before + matrices.to(entry["state_shared"]))
            return
        state = self.recurrent_state(layer)
        edited = state.clone()
        edited[:, head] += matrices.to(state)
        entry["state"] = edited

    def recurrent_state(self, layer: int) -> Tensor:
        """The matrix state ``[batch, head, d_k, d_v]`` of a recurrent layer."""
        try:
            entry = self.layers[layer]
            if keeps_shared_states(entry):
                raise ValueError(f"layer {layer} of this cache keeps shared snapshot states (rows_from_snapshots with "
                                 "shared_states=True), not one state per row; build the rows with shared_states=False "
                                 "to read or continue their states")
            return entry["state"]
        except (IndexError, KeyError):
            raise KeyError(f"layer {layer} holds no recurrent state in this cache (is it a recurrent layer?)") from None

