"""The paper's substitution (replacement) test as one batched, exact call.

At a position t where the SAE's code of head h's state is non-zero (a *firing*), the native write
``Delta = beta_t k_t v_t^T`` is replaced by

- **atom**: ``c * A_{i*}``, the dominant active atom ``i* = argmax_i a_i(t)`` at its natural coefficient
  ``c = a_{i*}(t)`` (or rescaled to ``||Delta||_F`` with ``amplitude="native_norm"``);
- **delete**: nothing;
- **random**: an alive atom that is not active at t (or a Gaussian rank-1 matrix), at the atom condition's norm;

and the KL between the native and the edited next-token distributions is recorded, both directions.

Timing (``timing``): ``"after_read"`` (the paper's: the cache is edited after position t was read, so the first output
that changes is the one at t + 1) or ``"write"`` (the write itself is edited, so the output at t changes). Where the
KL is read (``kl_at``): ``"next"``, the first output the edit can change, or ``"end"``, the passage's last position
with the rest teacher-forced.

How it is fast and still exact: per passage with firings, one native pass (layers before the edited one run once
and their output is reused by every condition) which also keeps native cache snapshots at the firing positions
(only those states are materialised, from the chunked algebra; no cache is ever copied per condition); then all
firings x conditions run as batches in which every row starts from its own snapshot (rows sit at different
positions: the batched cache carries per-row positions and masks its attention keys) and runs only the positions
up to where its KL is read, one position for ``kl_at="next"``.
Every record equals what the hook path (``interventions.add_to_state`` on the whole passage) gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..interventions import TIMING_HOOKS, atom_matrices, gaussian_rank1, mixer_hook
from .records import FiringRecord, records_frame

CONDITIONS = ("atom", "delete", "random")


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
    # passage -> residual stream entering the layer [pos, d_model], kept so the layers before it never run again
    residuals: dict[int, Tensor] = field(default_factory=dict)

    def firings(self) -> list[tuple[int, int, int]]:
        """Every (passage, position, feature) with a non-zero code."""
        return list(zip(self.passage.tolist(), self.position.tolist(), self.feature.tolist()))

    def active_at(self) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        """(passage, position) -> (active features, their codes)."""
        keys = self.passage * self.n_pos + self.position
        bounds = np.flatnonzero(np.diff(keys)) + 1
        groups = {}
        for index in np.split(np.arange(len(keys)), bounds):
            if len(index):
                groups[(int(self.passage[index[0]]), int(self.position[index[0]]))] = (self.feature[index], self.code[index])
        return groups


def check_cell(model, sae, layer: int, head: int) -> None:
    """Clear errors when the layer is not recurrent, the head is out of range, or the SAE belongs elsewhere."""
    recurrent = [i for i, block in enumerate(model.blocks) if hasattr(block, "mixer")]
    if layer not in recurrent:
        raise ValueError(f"layer {layer} is not a recurrent layer of this model; recurrent layers: {recurrent}")
    n_heads = model.cfg.n_heads
    if not 0 <= head < n_heads:
        raise ValueError(f"head {head} is out of range; this model's recurrent layers have heads 0..{n_heads - 1}")
    cfg = sae.cfg
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    if (getattr(cfg, "d_k", None), getattr(cfg, "d_v", None)) != (d_k, d_v):
        raise ValueError(f"the SAE's state shape (d_k, d_v) = ({getattr(cfg, 'd_k', None)}, "
                         f"{getattr(cfg, 'd_v', None)}) does not match the model's ({d_k}, {d_v})")
    metadata = getattr(cfg, "metadata", None)
    hook_name = getattr(metadata, "hook_name", None)
    expected = mixer_hook(layer, "hook_state")
    if hook_name not in (None, expected):
        raise ValueError(f"the SAE was trained on {hook_name!r}, not on {expected!r}")
    head_index = getattr(metadata, "hook_head_index", None)
    if head_index is not None and head_index != head:
        raise ValueError(f"the SAE was trained on head {head_index}, not on head {head}")


@torch.no_grad()
def head_states(model, tokens: Tensor, layer: int, head: int) -> tuple[Tensor, dict[str, Tensor]]:
    """States ``[batch, pos, d_k * d_v]`` of one head, from that head's write factors only (no all-head trajectory),
    and the native factors ``k`` [b, p, d_k], ``v`` [b, p, d_v], ``beta`` [b, p], plus ``resid`` [b, p, d_model], the
    residual stream entering the layer."""
    mixer = model.blocks[layer].mixer
    extras = mixer.transition_factor_names  # e.g. RWKV-7's erase factors
    names = {n: mixer_hook(layer, f"hook_{n}") for n in ("write_k", "write_v", "write_beta", "decay", *extras)}
    names["resid"] = f"blocks.{layer}.hook_resid_pre"
    _, cache = model.run_with_cache(tokens, names_filter=list(names.values()), stop_at_layer=layer + 1)
    head_of = {n: cache[names[n]][:, :, head : head + 1].float() for n in names if n != "resid"}
    k, v, beta = head_of["write_k"], head_of["write_v"], head_of["write_beta"]
    transition = mixer._transition(k, beta, head_of["decay"], {n: head_of[n] for n in extras})
    _, _, trajectory = mixer._recurrence(k, k, beta[..., None] * v, transition, None, return_trajectory=True)
    factors = {"k": k[:, :, 0], "v": v[:, :, 0], "beta": beta[:, :, 0], "resid": cache[names["resid"]]}
    return trajectory[:, :, 0].flatten(-2), factors


@torch.no_grad()
def scan_firings(model, sae, layer: int, head: int, tokens: Tensor, batch_size: int = 8,
                 progress: bool = True, keep_residuals: bool = False) -> FiringScan:
    """Encode every position's state of (layer, head) and keep the active features (code > 0); with
    ``keep_residuals``, also the residual stream entering the layer of every passage that has a firing
    (n_passages x pos x d_model floats, on the model's device)."""
    check_cell(model, sae, layer, head)
    n_passages, n_pos = tokens.shape
    scan = FiringScan(layer, head, n_passages, n_pos)
    alive = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    parts = []
    for start in tqdm(range(0, n_passages, batch_size), desc="scan firings", disable=not progress):
        states, factors = head_states(model, tokens[start : start + batch_size], layer, head)
        if not torch.isfinite(states).all():
            raise ValueError("non-finite recurrent states in the scanned passages")
        codes = sae.encode(states.to(sae.device, sae.dtype)).float().cpu()  # [b, p, d_sae]
        active = codes > 0
        alive |= active.flatten(0, 1).any(0)
        b, t, f = active.nonzero(as_tuple=True)
        if keep_residuals:
            for row in b.unique().tolist():
                scan.residuals[start + row] = factors["resid"][row].clone()
        parts.append(np.stack([(b + start).numpy(), t.numpy(), f.numpy()]).astype(np.int64))
        parts.append(codes[b, t, f].numpy())
    index = np.concatenate(parts[0::2], axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
    values = np.concatenate(parts[1::2]) if parts else np.zeros(0, dtype=np.float32)
    scan.passage, scan.position, scan.feature, scan.code, scan.alive = index[0], index[1], index[2], values, alive
    return scan


def select_firings(scan: FiringScan, max_per_feature: int | None = 300, max_total: int | None = None,
                   seed: int = 2026, exclude_positions: set[int] = frozenset()) -> list[tuple[int, int, int]]:
    """Uniformly sample at most ``max_per_feature`` firings per feature, then at most ``max_total`` overall."""
    rng = np.random.default_rng(seed)
    by_feature: dict[int, list[tuple[int, int, int]]] = {}
    for firing in scan.firings():
        if firing[1] not in exclude_positions:
            by_feature.setdefault(firing[2], []).append(firing)
    chosen = []
    for feature in sorted(by_feature):
        pool = by_feature[feature]
        if max_per_feature is not None and len(pool) > max_per_feature:
            pool = [pool[i] for i in sorted(rng.choice(len(pool), max_per_feature, replace=False))]
        chosen.extend(pool)
    if max_total is not None and len(chosen) > max_total:
        chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), max_total, replace=False))]
    return sorted(chosen)


@torch.no_grad()
def replacement_test(
    model,
    sae,
    layer: int,
    head: int,
    tokens: Tensor,
    *,
    max_firings_per_feature: int | None = 300,
    max_firings: int | None = None,
    seed: int = 2026,
    amplitude: Literal["natural", "native_norm"] = "natural",
    timing: Literal["after_read", "write"] = "after_read",
    kl_at: Literal["next", "end"] = "next",
    random_control: Literal["atom", "gaussian"] = "atom",
    batch_size: int = 96,
    scan_batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the substitution protocol on ``tokens`` ``[n_passages, n_pos]``; one record per selected firing.

    ``batch_size`` bounds the rows (firings x 3 conditions) run together, and so the memory. The records table has
    the columns of ``writesae_lens.evaluation.records`` (``kl_*`` = KL(p_native || p_condition), ``kl_*_rev`` the
    other direction); save it with ``records.save_records``.
    """
    if timing not in TIMING_HOOKS:
        raise ValueError(f"timing must be one of {sorted(TIMING_HOOKS)}, got {timing!r}")
    if kl_at not in ("next", "end"):
        raise ValueError(f"kl_at must be 'next' or 'end', got {kl_at!r}")
    if amplitude not in ("natural", "native_norm"):
        raise ValueError(f"amplitude must be 'natural' or 'native_norm', got {amplitude!r}")
    if random_control not in ("atom", "gaussian"):
        raise ValueError(f"random_control must be 'atom' or 'gaussian', got {random_control!r}")
    tokens = model._as_tokens(tokens, prepend_bos=False)
    scan = scan_firings(model, sae, layer, head, tokens, scan_batch_size, progress, keep_residuals=True)
    last = tokens.shape[1] - 1
    excluded = {last} if timing == "after_read" else set()  # an edit after the last read changes no output
    chosen = select_firings(scan, max_firings_per_feature, max_firings, seed, excluded)
    if not chosen:
        raise ValueError(
            f"no firings to test at layer {layer} head {head}: the SAE's code is zero at every usable position "
            f"of the {tokens.shape[0]} passages (or the caps exclude them all)"
        )
    atoms = atom_matrices(sae, torch.arange(sae.cfg.d_sae), sae.cfg.d_sae)  # [d_sae, d_k, d_v]
    atom_norms = atoms.flatten(1).norm(dim=-1)
    positions_by_passage: dict[int, list[int]] = {}
    for p, t, _ in chosen:
        positions_by_passage.setdefault(p, [])
        if t not in positions_by_passage[p]:
            positions_by_passage[p].append(t)

    active_at = scan.active_at()
    outcome: dict[tuple[int, int], dict] = {}
    bar = tqdm(total=sum(map(len, positions_by_passage.values())), desc="substitution test", disable=not progress)
    for p, positions in sorted(positions_by_passage.items()):
        plan = _PassagePlan(model, layer, head, scan.residuals.pop(p)[None], timing, kl_at, positions)
        edits = {}
        for t in sorted(positions):
            features, codes = active_at[(p, t)]
            features = torch.as_tensor(features)
            best = int(codes.argmax())
            atom, coefficient = int(features[best]), float(codes[best])
            native = plan.native_write(t)
            native_norm = float(native.norm())
            scale = coefficient if amplitude == "natural" else native_norm / max(float(atom_norms[atom]), 1e-30)
            atom_write = scale * atoms[atom]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + p * 10_007 + t)
            if random_control == "atom":
                active = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
                active[features] = True
                candidates = (scan.alive & ~active).nonzero().squeeze(-1)
                if len(candidates) == 0:
                    raise ValueError("no alive, non-active atom for the random control; use random_control='gaussian'")
                other = int(candidates[torch.randint(len(candidates), (1,), generator=generator)])
                random_write = atoms[other] * (float(atom_write.norm()) / max(float(atom_norms[other]), 1e-30))
            else:
                d_k, d_v = atoms.shape[1:]
                random_write = gaussian_rank1(d_k, d_v, [float(atom_write.norm())], generator)[0]
            edits[t] = {"atom": atom_write - native, "delete": -native, "random": random_write - native}
            outcome[(p, t)] = {"atom": atom, "coefficient": coefficient, "native_write_norm": native_norm}
        for t, result in plan.run(edits, batch_size, bar).items():
            outcome[(p, t)].update(result)
    bar.close()

    records = []
    for p, t, feature in chosen:
        o = outcome[(p, t)]
        records.append(FiringRecord(
            passage=p, position=t, layer=layer, head=head, feature=feature, atom=o["atom"],
            coefficient=o["coefficient"], native_write_norm=o["native_write_norm"],
            kl_atom=o["kl_atom"], kl_delete=o["kl_delete"], kl_random=o["kl_random"],
            kl_atom_rev=o["kl_atom_rev"], kl_delete_rev=o["kl_delete_rev"], kl_random_rev=o["kl_random_rev"],
            top1_native=o["top1_native"], top1_atom=o["top1_atom"], top1_delete=o["top1_delete"],
            top1_random=o["top1_random"],
        ))
    return records_frame(records)


class _PassagePlan:
    """One passage: the residual stream entering the edited layer, then one pass of the later layers that gives the
    native outputs and keeps native cache snapshots at the firings' start positions, then batched edited runs in
    which every row starts from its own snapshot."""

    def __init__(self, model, layer: int, head: int, resid: Tensor, timing: str, kl_at: str, firing_positions) -> None:
        self.model, self.layer, self.head, self.timing, self.kl_at = model, layer, head, timing, kl_at
        self.n_pos = resid.shape[1]
        self.resid = resid  # [1, pos, d_model]: the layers before `layer` ran once, in the scan
        unique_starts = sorted({self.start_position(t) for t in firing_positions})
        self.snapshot_index = {s: i for i, s in enumerate(unique_starts)}
        self.snapshot_cache = model.empty_cache()
        self.snapshot_cache.request_snapshots(unique_starts, range(layer, model.cfg.n_layers))
        names = [mixer_hook(layer, f"hook_{n}") for n in ("write_k", "write_v", "write_beta")]
        logits, cache = model.run_with_cache(self.resid, start_at_layer=layer, cache=self.snapshot_cache,
                                             names_filter=names)
        self.native_logp = F.log_softmax(logits[0].double(), dim=-1)  # [pos, d_vocab], fp64: KLs of 1e-7 stay positive
        self.k, self.v, self.beta = (cache[n][0, :, head].float() for n in names)

    def native_write(self, t: int) -> Tensor:
        return self.beta[t] * torch.outer(self.k[t], self.v[t]).cpu()

    def start_position(self, t: int) -> int:
        """The first position an edited row runs: t itself for a write edit, t + 1 for an edit after the read."""
        return t + 1 if self.timing == "after_read" else t

    def read_position(self, t: int) -> int:
        return self.start_position(t) if self.kl_at == "next" else self.n_pos - 1

    def run(self, edits: dict[int, dict[str, Tensor]], batch_size: int, bar) -> dict[int, dict]:
        positions = sorted(edits)
        results = {}
        per_group = max(1, batch_size // len(CONDITIONS))
        for start in range(0, len(positions), per_group):
            group = positions[start : start + per_group]
            results.update(self._run_group(group, edits))
            bar.update(len(group))
        return results

    def _run_group(self, group: list[int], edits) -> dict[int, dict]:
        rows = [(t, condition) for t in group for condition in CONDITIONS]
        starts = torch.tensor([self.start_position(t) for t, _ in rows])
        reads = torch.tensor([self.read_position(t) for t, _ in rows])
        span = int((reads - starts).max()) + 1
        cache = self.snapshot_cache.rows_from_snapshots(torch.tensor([self.snapshot_index[int(s)] for s in starts]))
        d_model = self.resid.shape[-1]
        resid = torch.zeros(len(rows), span, d_model, dtype=self.resid.dtype, device=self.resid.device)
        for r, s in enumerate(starts.tolist()):  # each row runs its own positions; the tail past the passage is padding
            length = min(span, self.n_pos - s)
            resid[r, :length] = self.resid[0, s : s + length]
        matrices = torch.stack([edits[t][condition] for t, condition in rows])  # [rows, d_k, d_v]

        if self.timing == "after_read":  # the edit is a change of the cached state: no hook needed
            state = cache.layers[self.layer]["state"].clone()
            state[:, self.head] += matrices.to(state)
            cache.layers[self.layer]["state"] = state
            hooks = []
        else:  # the edit is part of the write at the row's first position
            cells = torch.tensor([[r, 0, self.head] for r in range(len(rows))])

            def add(x: Tensor, hook) -> Tensor:
                return x + torch.sparse_coo_tensor(cells.T.to(x.device), matrices.to(x.device), x.shape,
                                                   check_invariants=False)

            hooks = [(mixer_hook(self.layer, TIMING_HOOKS["write"]), add)]
        with self.model.hooks(fwd_hooks=hooks):
            logits = self.model(resid, start_at_layer=self.layer, cache=cache)
        cond_logp = F.log_softmax(logits[torch.arange(len(rows)), reads - starts].double(), dim=-1).cpu()
        native_logp = self.native_logp[reads].cpu()
        kl = (native_logp.exp() * (native_logp - cond_logp)).sum(-1)
        kl_rev = (cond_logp.exp() * (cond_logp - native_logp)).sum(-1)
        results: dict[int, dict] = {}
        for r, (t, condition) in enumerate(rows):
            entry = results.setdefault(t, {"top1_native": int(native_logp[r].argmax())})
            entry[f"kl_{condition}"] = float(kl[r])
            entry[f"kl_{condition}_rev"] = float(kl_rev[r])
            entry[f"top1_{condition}"] = int(cond_logp[r].argmax())
        return results
