"""Passage-level bits per token (paper-method §3.7, Fig. 2b): delete or randomly replace the write at every position
where a register atom fires, all at once, and measure the passage's next-token loss.

At every position t of a passage where any of the given atoms is active in the SAE's code of the native state S_t,
the native write ``Delta_t = beta_t k_t v_t^T`` is

- ``delete``: removed (``S_t - Delta_t``);
- ``random``: replaced by a Gaussian rank-1 matrix ``u w^T`` at ``||Delta_t||_F`` (seeded per passage);

after the read at t (``timing="after_read"``, the paper's cache edit; ``"write"`` edits the write itself). The edits
compound: each one changes every later state of the head. The result is the change of the mean next-token loss of
the passage, in bits per token, against the native run.

Exact and cheap: the write factors of the edited layer do not depend on its own state (they come from the residual
stream entering it), so every edit is known from one scan; each passage then runs once per condition from the edited
layer on (native, delete and random as rows of one batch), with all its edits as ``interventions.add_to_state``
hooks. A test checks it against the hook path on the whole passage (``interventions.delete_write`` /
``substitute_write`` from the first layer).

Precision and the floor (issue #18): the native loss is the passage's unedited row, in the same batch as its edited
rows (one computation: a condition that edits nothing gives exactly the native loss, in bf16 too). With
``precision="float32"`` (the default) the rows run the edited layer, every later layer, the final norm and the
unembedding in float32 whatever the model's dtype (``tail_precision.comparison_model``; a float32 model is run as it
is; RWKV-7 from layer 0, ``full_run_start``). The scan that finds the firings and the native writes runs in that
precision too, so that ``delete`` removes exactly the write the float32 layer makes. Each passage's ``floor`` is |native row - native pass| in bits per token, where the native pass is the batch's
native rows run once more in a call of their own (another batch shape, no hooks): two computations of the same loss
that differ only in rounding. ``summarize_bits`` reports the largest and the passages whose deltas it does not
resolve.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..interventions import add_to_state, gaussian_rank1
from .firings import check_cell, head_states
from .passages import as_passages
from .tail_precision import as_tail_input, comparison_model, full_run, full_run_start

BITS_CONDITIONS = ("delete", "random")


@torch.no_grad()
def passage_bits_per_token(model, sae, layer: int, head: int, tokens, atoms, *, seed: int = 2026,
                           timing: str = "after_read", batch_size: int = 4, precision: str = "float32",
                           progress: bool = True) -> pd.DataFrame:
    """One row per passage: ``edits`` (positions where one of ``atoms`` fires), the native mean next-token loss in
    bits per token (``bits_native``, the unedited row), per condition ``bits_{condition}`` and ``delta_{condition}``
    (condition minus native), and ``floor`` (|native row - native pass|, bits per token). Passages with no firing
    have zero deltas. ``precision``: ``"float32"`` (the layers from the edited one on in float32) or ``"model"``."""
    check_cell(model, sae, layer, head)
    start_layer = full_run_start(model, layer)
    runner = comparison_model(model, start_layer, precision)  # what runs from start_layer on
    dtype = next(runner.blocks[layer].parameters()).dtype
    tokens = as_passages(model, tokens)
    atoms = torch.as_tensor(list(atoms), dtype=torch.long)
    if len(atoms) and (int(atoms.min()) < 0 or int(atoms.max()) >= sae.cfg.d_sae):
        raise ValueError(f"atoms must lie in 0..{sae.cfg.d_sae - 1}; got {atoms.tolist()}")
    rows = []
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="passage bits/token", disable=not progress):
        batch = tokens[start : start + batch_size]
        with full_run(model, runner, start_layer):  # the writes as the rows' own layer computes them
            states, factors = head_states(runner, batch, layer, head)
        codes = sae.encode(states.to(sae.device, sae.dtype))  # [b, p, d_sae]
        if len(atoms):
            fires = (codes[..., atoms.to(codes.device)] > 0).any(-1)  # [b, p]
        else:
            fires = torch.zeros(codes.shape[:2], dtype=torch.bool)
        b, t = fires.nonzero(as_tuple=True)
        b, t = b.to(factors["k"].device), t.to(factors["k"].device)
        native = factors["beta"][b, t, None, None] * factors["k"][b, t, :, None] * factors["v"][b, t, None, :]
        replacements = {"delete": torch.zeros_like(native), "random": _random_writes(native, b, start, seed)}
        n = len(batch)
        cells, matrices = [], []
        for c, condition in enumerate(BITS_CONDITIONS, start=1):  # row c * n + i: passage i under the condition
            cells.append(torch.stack([b + c * n, t, torch.full_like(t, head)], dim=1))
            matrices.append(replacements[condition] - native)
        hooks = add_to_state(layer, torch.cat(cells).cpu(), torch.cat(matrices).cpu(), timing) if len(b) else []
        native_streams = {name: as_tail_input(factors[name], dtype) for name in ("resid", *model.carried_streams)}
        streams = {name: x.repeat(1 + len(BITS_CONDITIONS), *[1] * (x.dim() - 1)) for name, x in native_streams.items()}
        with runner.hooks(fwd_hooks=hooks):
            bits = _bits(runner, layer, streams, batch.repeat(1 + len(BITS_CONDITIONS), 1))
        bits = bits.reshape(1 + len(BITS_CONDITIONS), n)
        floor = (bits[0] - _bits(runner, layer, native_streams, batch)).abs()  # the native pass: a call of its own
        edits = torch.bincount(b.cpu(), minlength=n)
        for i in range(n):
            row = {"passage": start + i, "edits": int(edits[i]), "bits_native": float(bits[0, i])}
            for c, condition in enumerate(BITS_CONDITIONS, start=1):
                row[f"bits_{condition}"] = float(bits[c, i])
                row[f"delta_{condition}"] = float(bits[c, i] - bits[0, i])
            row["floor"] = float(floor[i])
            rows.append(row)
    return pd.DataFrame(rows)


def _bits(runner, layer: int, streams: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss per row [rows] in bits per token (fp64, CPU) of a run from ``layer`` on."""
    carried = {name: streams[name] for name in runner.carried_streams} if layer > 0 else {}
    nll = runner(streams["resid"], start_at_layer=layer, tokens=tokens, return_type="loss", loss_per_token=True,
                 **carried)  # [rows, pos - 1], nats
    return (nll.double().mean(-1) / math.log(2)).cpu()


def _random_writes(native: torch.Tensor, rows: torch.Tensor, start: int, seed: int) -> torch.Tensor:
    """Gaussian rank-1 matrices at the native writes' norms, drawn per passage with its own seed (independent of the
    batching)."""
    out = torch.empty_like(native)
    norms = native.flatten(1).norm(dim=-1).cpu()
    for row in rows.unique().tolist():
        at = (rows == row).nonzero().flatten()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start + row)
        out[at] = gaussian_rank1(*native.shape[1:], norms[at.cpu()], generator).to(native)
    return out


def summarize_bits(table: pd.DataFrame) -> dict:
    """Mean deltas per condition, their ratio (random / delete), and in how many passages random was worse; with a
    ``floor`` column (since #18) also ``floor`` (the largest per-passage floor, bits per token) and ``below_floor``
    (passages with edits where a delta is at or below it in size: an effect the arithmetic does not resolve)."""
    delete, random = table["delta_delete"], table["delta_random"]
    summary = {
        "passages": len(table), "edits": int(table["edits"].sum()), "bits_native": float(table["bits_native"].mean()),
        "delta_delete": float(delete.mean()), "delta_random": float(random.mean()),
        "random_over_delete": float(random.mean() / delete.mean()) if delete.mean() else float("nan"),
        "random_worse": int((random > delete).sum()),
    }
    if "floor" in table.columns and len(table):
        floor = float(table["floor"].max())
        smallest = np.minimum(delete.abs().to_numpy(), random.abs().to_numpy())
        summary["floor"] = floor
        summary["below_floor"] = int(((table["edits"].to_numpy() > 0) & (smallest <= floor)).sum())
    return summary
