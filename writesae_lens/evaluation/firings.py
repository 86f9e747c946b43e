"""Where an SAE fires on one head's state: the scan of the substitution test, and the firings it tests.

The scan runs each batch of passages only up to the edited layer's write (no recurrence of that layer's heads, no later
layers), rebuilds the one head's states from its write factors, encodes them with the SAE and keeps every non-zero code.
It also keeps, per passage, what a later run from the edited layer needs (the residual stream entering it and any
stream the family carries past it, e.g. RWKV-7's v-first) and the head's native write factors.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..interventions import mixer_hook
from ..ops.finite import all_finite
from ..sae_match import check_sae_metadata, check_sae_shape


@dataclass
class FiringScan:
    """Every non-zero SAE code of one head's state, as parallel arrays sorted by (passage, position, feature)."""

    layer: int
    head: int
    n_passages: int
    n_pos: int
    passage: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    position: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    feature: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    code: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    alive: Tensor | None = None  # [d_sae] bool: fired at least once
    # passage -> {"resid": [pos, d_model] entering the layer, each carried stream [pos, ...], the head's native write
    # factors "k" [pos, d_k], "v" [pos, d_v], "beta" [pos]}: the layers before the edited one never run again
    passage_inputs: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    _keys: np.ndarray | None = field(default=None, repr=False)  # passage * n_pos + position, built on first lookup

    def active_at(self, passage: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """The active features at (passage, position) and their codes."""
        if self._keys is None or len(self._keys) != len(self.passage):
            self._keys = self.passage * self.n_pos + self.position  # sorted, as the scan is
        key = passage * self.n_pos + position
        lo, hi = np.searchsorted(self._keys, key, "left"), np.searchsorted(self._keys, key, "right")
        return self.feature[lo:hi], self.code[lo:hi]


def check_cell(model, sae, layer: int, head: int, *, ignore_sae_metadata: bool = False) -> None:
    """Clear errors when the layer is not recurrent, the head is out of range, or the SAE belongs elsewhere: its
    state shape (d_k, d_v) must be the model's, and the model, hook and head its metadata records (where it records
    them) must be these, unless ``ignore_sae_metadata`` (for an SAE known to transfer; ``sae_match``)."""
    recurrent = [i for i, block in enumerate(model.blocks) if hasattr(block, "mixer")]
    if not isinstance(layer, numbers.Integral) or layer not in recurrent:
        raise ValueError(f"layer {layer!r} is not a recurrent layer of this model; recurrent layers: {recurrent}")
    n_heads = model.cfg.n_heads
    if not isinstance(head, numbers.Integral) or not 0 <= head < n_heads:
        raise ValueError(f"head {head!r} is out of range; this model's recurrent layers have heads 0..{n_heads - 1}")
    check_sae_shape(sae, model.cfg.d_k, model.cfg.d_v, where=f"model {model.cfg.model_name!r}")
    check_sae_metadata(sae, model_name=model.cfg.model_name, layer=layer, heads=[head], ignore=ignore_sae_metadata)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once everything wanted has been seen."""


def capture_until(model, tokens: Tensor, names: list[str], stop_at: str) -> dict[str, Tensor]:
    """The activations at hook points ``names`` of one forward pass that is abandoned at hook point ``stop_at``
    (which must run after all of them, or be one of them: its capture runs first): nothing after it is computed."""
    captured: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> None:
        captured[hook.name] = x

    def stop(x: Tensor, hook) -> None:
        raise _Stop

    try:
        with model.hooks(fwd_hooks=[(name, keep) for name in names] + [(stop_at, stop)]):
            model(tokens)
    except _Stop:
        pass
    missing = [name for name in names if name not in captured]
    if missing:
        raise RuntimeError(f"hook points {missing} did not run before {stop_at!r}")
    return captured


@torch.no_grad()
def head_states(model, tokens: Tensor, layer: int, head: int) -> tuple[Tensor, dict[str, Tensor]]:
    """States ``[batch, pos, d_k * d_v]`` of one head, from that head's write factors only (no all-head trajectory),
    and the native factors ``k`` [b, p, d_k], ``v`` [b, p, d_v], ``beta`` [b, p], plus ``resid`` [b, p, d_model], the
    residual stream entering the layer, and each of the model's ``carried_streams`` [b, p, ...]. Nothing of that
    layer's recurrence or of later layers runs: where the mixer computes one head's factors by itself
    (``head_write_factors``), the forward pass stops where the layer starts; otherwise at the layer's read, with the
    factors captured from its hooks."""
    block = model.blocks[layer]
    mixer = block.mixer
    extras = mixer.transition_factor_names  # e.g. RWKV-7's erase factors
    streams = {"resid": f"blocks.{layer}.hook_resid_pre", **model.carried_streams}
    # carried streams (RWKV-7's v-first) are made inside layer 0's mixer: the early stop needs a later layer
    if mixer.has_head_write_factors and (layer > 0 or not model.carried_streams):
        cache = capture_until(model, tokens, list(streams.values()), streams["resid"])
        head_of = mixer.head_write_factors(block.mixer_input(cache[streams["resid"]]), head)
    else:
        names = {n: mixer_hook(layer, f"hook_{n}") for n in ("write_k", "write_v", "write_beta", "decay", *extras)}
        cache = capture_until(model, tokens, [*names.values(), *streams.values()], mixer_hook(layer, "hook_read_q"))
        head_of = {n: cache[names[n]][:, :, head : head + 1].float() for n in names}
    k, v, beta = head_of["write_k"], head_of["write_v"], head_of["write_beta"]
    transition = mixer._transition(k, beta, head_of["decay"], {n: head_of[n] for n in extras})
    _, _, trajectory = mixer._recurrence(k, k, beta[..., None] * v, transition, None, return_trajectory=True)
    # "decay": the log decay g_t, [b, p] (or per key channel, [b, p, d_k]): the delta form of the write needs it
    factors = {"k": k[:, :, 0], "v": v[:, :, 0], "beta": beta[:, :, 0], "decay": head_of["decay"][:, :, 0].float()}
    factors.update({stream: cache[name] for stream, name in streams.items()})
    return trajectory[:, :, 0].flatten(-2), factors


@torch.no_grad()
def scan_firings(model, sae, layer: int, head: int, tokens: Tensor, batch_size: int = 8,
                 progress: bool = True, keep_inputs: bool = False, ignore_sae_metadata: bool = False) -> FiringScan:
    """Encode every position's state of (layer, head) and keep the active features (code > 0); with
    ``keep_inputs``, also ``passage_inputs`` of every passage that has a firing (on the model's device).
    ``ignore_sae_metadata``: see ``check_cell``."""
    check_cell(model, sae, layer, head, ignore_sae_metadata=ignore_sae_metadata)
    n_passages, n_pos = tokens.shape
    scan = FiringScan(layer, head, n_passages, n_pos)
    alive = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    parts = []
    for start in tqdm(range(0, n_passages, batch_size), desc="scan firings", disable=not progress):
        states, factors = head_states(model, tokens[start : start + batch_size], layer, head)
        if not all_finite(states):
            raise ValueError("non-finite recurrent states in the scanned passages")
        codes = sae.encode(states.to(sae.device, sae.dtype)).float().cpu()  # [b, p, d_sae]
        active = codes > 0
        alive |= active.flatten(0, 1).any(0)
        b, t, f = active.nonzero(as_tuple=True)
        if keep_inputs:
            for row in b.unique().tolist():
                scan.passage_inputs[start + row] = {name: x[row].clone() for name, x in factors.items()}
        parts.append(np.stack([(b + start).numpy(), t.numpy(), f.numpy()]).astype(np.int64))
        parts.append(codes[b, t, f].numpy())
    index = np.concatenate(parts[0::2], axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
    values = np.concatenate(parts[1::2]) if parts else np.zeros(0, dtype=np.float32)
    scan.passage, scan.position, scan.feature, scan.code, scan.alive = index[0], index[1], index[2], values, alive
    return scan


def select_firings(scan: FiringScan, max_per_feature: int | None = 300, max_total: int | None = None,
                   seed: int = 2026, exclude_positions: set[int] = frozenset()) -> list[tuple[int, int, int]]:
    """Uniformly sample at most ``max_per_feature`` firings per feature (features in increasing order, one draw
    each where the cap bites), then at most ``max_total`` overall; returned sorted by (passage, position, feature)."""
    rng = np.random.default_rng(seed)
    usable = np.flatnonzero(~np.isin(scan.position, np.fromiter(exclude_positions, dtype=np.int64)))
    by_feature = usable[np.argsort(scan.feature[usable], kind="stable")]  # scan order within each feature
    features, starts = np.unique(scan.feature[by_feature], return_index=True)
    pools = np.split(by_feature, starts[1:]) if len(features) else []
    for i, pool in enumerate(pools):
        if max_per_feature is not None and len(pool) > max_per_feature:
            pools[i] = pool[np.sort(rng.choice(len(pool), max_per_feature, replace=False))]
    chosen = np.concatenate(pools) if pools else np.zeros(0, dtype=np.int64)
    if max_total is not None and len(chosen) > max_total:
        chosen = chosen[np.sort(rng.choice(len(chosen), max_total, replace=False))]
    chosen = np.sort(chosen)  # scan order = (passage, position, feature) order
    return list(zip(scan.passage[chosen].tolist(), scan.position[chosen].tolist(), scan.feature[chosen].tolist()))
