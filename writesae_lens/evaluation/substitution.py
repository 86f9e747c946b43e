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

How it is fast and still exact: the scan (``firings.py``) runs the layers before the edited one once, up to its
write; one batched native pass from the edited layer per group of passages with firings keeps each passage's cache
snapshots at its firing positions (only those states are materialised, from the chunked algebra; no cache is ever
copied per condition); then firings x conditions of any passages run as batches in which every row starts from its
own snapshot, shares its passage's attention keys, and runs only the positions up to where its KL is read
(``edited_runs.py``).
Every record equals what the hook path (``interventions.add_to_state`` on the whole passage) gives.
"""

from __future__ import annotations

import numbers
from typing import Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..interventions import atom_matrices, gaussian_rank1, random_alive_atoms
from .edited_runs import EditedRuns, check_run_options
from .firings import FiringScan, check_cell, head_states, scan_firings, select_firings
from .numerical_floor import with_floor_flags
from .passages import as_passages
from .records import CONDITIONS, RECORD_COLUMNS, FiringRecord, records_frame

__all__ = ["CONDITIONS", "FiringScan", "check_cell", "head_states", "replacement_test", "scan_firings",
           "select_firings"]


@torch.no_grad()
def replacement_test(
    model,
    sae,
    layer: int,
    head: int,
    tokens,
    *,
    max_firings_per_feature: int | None = 300,
    max_firings: int | None = None,
    seed: int = 2026,
    amplitude: Literal["natural", "native_norm"] = "natural",
    timing: Literal["after_read", "write"] = "after_read",
    kl_at: Literal["next", "end"] = "next",
    random_control: Literal["atom", "gaussian"] = "atom",
    substitute=None,
    batch_size: int = 192,
    passage_batch_size: int = 8,
    progress: bool = True,
    ignore_sae_metadata: bool = False,
    precision: Literal["float32", "model"] = "float32",
    firings=None,
) -> pd.DataFrame:
    """Run the substitution protocol on the passages ``tokens``; one record per selected firing.

    ``tokens``: a token tensor ``[n_passages, n_pos]``, a list of such batches, a dataset with a ``tokens`` or
    ``input_ids`` column, or text; every passage must have the same length (``evaluation.passages``).

    ``batch_size`` bounds the rows (firings x 3 conditions) run together and ``passage_batch_size`` the passages of
    one forward pass of the scan and of the native passes (with their cache snapshots), and so the memory. The
    records table has the columns of ``writesae_lens.evaluation.records`` (``kl_*`` = KL(p_native || p_condition),
    ``kl_*_rev`` the other direction); save it with ``records.save_records``.

    ``substitute``: another source of the atom condition's matrices (the flat+SVD baseline, ``baselines.py``):
    ``substitute(passage, positions, active, native_norms) -> [m, d_k, d_v]`` with ``active[i]`` the (features,
    codes) at ``positions[i]``; the random control then takes those matrices' norms. None: ``c * A_{i*}``.

    The SAE must encode this model's state shape, and the model, hook and head its metadata records must be these;
    ``ignore_sae_metadata=True`` accepts an SAE of another model, layer or head of the same shape (``check_cell``).

    ``precision``: ``"float32"`` (default) runs the edited layer, the later layers, the final norm and the unembedding
    in float32 whatever the model's dtype, so that a bfloat16 model's KLs measure the edit and not the rounding (a
    float32 or float64 model is used as it is); ``"model"`` runs them in the model's dtype. Either way the native
    reference is an unedited row through the same computation as the conditions, and each record holds
    ``kl_floor`` (two computations of the native distribution against each other) and ``below_floor`` (a condition
    KL at or below the run's floor, the largest ``kl_floor``): ``numerical_floor.py``, docs/substitution.md.

    ``firings``: test exactly these ``(passage, position, feature)`` triples (e.g. another run's
    ``records[["passage", "position", "feature"]]``) instead of sampling; the caps and ``seed``'s sampling are then
    not used. Each position must have an active feature in this run's scan (the atom is chosen from them).
    """
    if amplitude not in ("natural", "native_norm"):
        raise ValueError(f"amplitude must be 'natural' or 'native_norm', got {amplitude!r}")
    if random_control not in ("atom", "gaussian"):
        raise ValueError(f"random_control must be 'atom' or 'gaussian', got {random_control!r}")
    for name, value in (("batch_size", batch_size), ("passage_batch_size", passage_batch_size)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("max_firings_per_feature", max_firings_per_feature), ("max_firings", max_firings)):
        if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None (no cap), got {value!r}")
    tokens = as_passages(model, tokens)  # [n_passages, n_pos]
    check_run_options(timing, kl_at, precision)
    scan = scan_firings(model, sae, layer, head, tokens, passage_batch_size, progress, keep_inputs=True,
                        ignore_sae_metadata=ignore_sae_metadata)  # the SAE must belong to this model, hook and head
    last = tokens.shape[1] - 1
    excluded = {last} if timing == "after_read" else set()  # an edit after the last read changes no output
    if firings is None:
        chosen = select_firings(scan, max_firings_per_feature, max_firings, seed, excluded)
    else:
        chosen = _given_firings(scan, firings, excluded)
    if not chosen:
        raise ValueError(
            f"no firings to test at layer {layer} head {head}: the SAE's code is zero at every usable position "
            f"of the {tokens.shape[0]} passages (or the caps exclude them all)"
        )
    device = model.cfg.device
    atoms = atom_matrices(sae, torch.arange(sae.cfg.d_sae), sae.cfg.d_sae).to(device, torch.float32)  # [d_sae, k, v]
    atom_norms = atoms.flatten(1).norm(dim=-1).cpu()
    positions_by_passage: dict[int, list[int]] = {}
    for p, t, _ in chosen:
        positions = positions_by_passage.setdefault(p, [])
        if not positions or positions[-1] != t:  # chosen is sorted by (passage, position)
            positions.append(t)

    outcome: dict[tuple[int, int], dict] = {}
    bar = tqdm(total=sum(map(len, positions_by_passage.values())), desc="substitution test", disable=not progress)
    runs = EditedRuns(model, layer, head, timing, kl_at, batch_size, progress=bar, precision=precision)
    group = []  # passages waiting for their (batched) native pass
    for p, positions in positions_by_passage.items():
        inputs = scan.passage_inputs.pop(p)
        at = torch.tensor(positions, device=inputs["k"].device)
        native = inputs["beta"][at, None, None] * inputs["k"][at, :, None] * inputs["v"][at, None, :]  # [m, d_k, d_v]
        native_norm = native.flatten(1).norm(dim=-1).cpu()
        active = torch.zeros(len(positions), sae.cfg.d_sae, dtype=torch.bool)  # [m, d_sae]
        chosen_atoms, coefficients = [], []
        for i, t in enumerate(positions):
            features, codes = scan.active_at(p, t)
            active[i, features] = True
            best = int(codes.argmax())
            chosen_atoms.append(int(features[best]))
            coefficients.append(float(codes[best]))
        chosen_atoms = torch.tensor(chosen_atoms)
        if amplitude == "natural":
            scales = torch.tensor(coefficients)
        else:
            scales = native_norm / atom_norms[chosen_atoms].clamp_min(1e-30)
        atom_writes = scales.to(device)[:, None, None] * atoms[chosen_atoms.to(device)]  # [m, d_k, d_v]
        random_norms = scales.abs() * atom_norms[chosen_atoms]  # the atom condition's norms
        if substitute is not None:  # another source of the atom condition's matrices (baselines.py)
            atom_writes = substitute(p, positions, [scan.active_at(p, t) for t in positions], native_norm)
            atom_writes = atom_writes.to(device, torch.float32)
            random_norms = atom_writes.flatten(1).norm(dim=-1).cpu()
        # draws seeded per passage: the records do not depend on batch_size
        generator = torch.Generator().manual_seed(seed * 1_000_003 + p)
        if random_control == "atom":
            try:
                others = random_alive_atoms(active, scan.alive, generator)
            except ValueError as error:
                raise ValueError(f"{error}; or use random_control='gaussian'") from None
            random_writes = atoms[others.to(device)] * (random_norms / atom_norms[others].clamp_min(1e-30)).to(device)[
                :, None, None]
        else:
            random_writes = gaussian_rank1(*atoms.shape[1:], random_norms, generator).to(device)
        replaced = torch.stack([atom_writes, torch.zeros_like(native), random_writes], dim=1) - native[:, None]
        edits = {t: dict(zip(CONDITIONS, replaced[i])) for i, t in enumerate(positions)}  # [m, 3, d_k, d_v], viewed
        for i, t in enumerate(positions):
            outcome[(p, t)] = {"atom": int(chosen_atoms[i]), "coefficient": coefficients[i],
                               "native_write_norm": float(native_norm[i])}
        group.append((p, inputs, edits))
        if len(group) == passage_batch_size:
            runs.add(group)
            group = []
    if group:
        runs.add(group)
    runs.finish()
    bar.close()

    records, floors = [], []
    for p, t, feature in chosen:
        o = {**outcome[(p, t)], **runs.results[(p, t)]}
        records.append(FiringRecord(passage=p, position=t, layer=layer, head=head, feature=feature,
                                    **{name: o[name] for name in RESULT_FIELDS}))
        floors.append(o["kl_floor"])
    return with_floor_flags(records_frame(records), np.array(floors))


def _given_firings(scan: FiringScan, firings, excluded: set[int]) -> list[tuple[int, int, int]]:
    """The given ``(passage, position, feature)`` triples, checked against the scan, sorted as sampled ones are."""
    if isinstance(firings, pd.DataFrame):
        firings = firings[["passage", "position", "feature"]].itertuples(index=False)
    chosen = sorted({(int(p), int(t), int(f)) for p, t, f in firings})
    bad = [(p, t) for p, t, _ in chosen if not (0 <= p < scan.n_passages and 0 <= t < scan.n_pos) or t in excluded]
    if bad:
        raise ValueError(f"{len(bad)} given firings lie outside the passages or at an excluded position, e.g. "
                         f"(passage, position) {bad[0]}")
    silent = sorted({(p, t) for p, t, _ in chosen if len(scan.active_at(p, t)[0]) == 0})
    if silent:
        raise ValueError(f"the SAE has no active feature at {len(silent)} of the given positions in this run, e.g. "
                         f"(passage, position) {silent[0]}; drop them first (scan_firings shows where it fires)")
    return chosen


# what a record holds besides where the firing is: the outcome of testing it
RESULT_FIELDS = tuple(c for c in RECORD_COLUMNS if c not in ("passage", "position", "layer", "head", "feature"))
