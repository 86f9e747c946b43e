"""Reconstruction in the cache (paper-method §8.3): splice a reconstruction of the recurrent state into the cache at
a prefix boundary and measure the suffix's next-token loss against the native run.

Per passage: run the prefix (positions ``0 .. prefix_len - 1``) with a cache; replace the state of the chosen heads of
layer ``layer`` by a function of it (a *splice*); run the suffix from that cache; the loss is the mean next-token loss
of the suffix predicting its own tokens (``suffix_len - 1`` tokens, as the authors' code). Splices:

- ``sae_splice({head: sae, ...})``: each head's state replaced by its own SAE's reconstruction
  ``decode(encode(S))`` (decoder bias included, residual not added back); one head, or every head of the layer;
- ``svd_splice(rank)``: each chosen head's state replaced by its rank-r truncation ``sum_{i<r} s_i u_i v_i^T``.

Fast and exact: the prefix runs **once** per passage for all conditions, batched over passages. The native suffix
runs once from that cache (the *native pass*: it gives the residual stream entering the edited layer, which no
splice changes); every condition's suffix then runs only from the edited layer on, with passages x (conditions + one
unspliced row) as rows of batches, each row's cache a copy of its passage's prefix cache (attention keys included)
with the splice applied. The authors' scripts rerun the prefix per condition; ``bench/bench_reconstruction.py``
compares the two (same losses).

Precision and the floor (issue #18). The ``native`` loss is the unspliced row of the passage, through the same
computation as its conditions (a passage's rows share a batch whenever ``row_batch_size`` holds them), so the rounding
of the row path cancels in every difference: a splice that changes nothing gives exactly the native loss, in bf16
too. With ``precision="float32"`` (the default) the prefix, the native pass and the rows run the edited layer, every
later layer, the final norm and the unembedding in float32 whatever the model's dtype (``tail_precision``; RWKV-7
from layer 0, ``full_run_start``); a float32 model is run as it is. Each passage's ``floor`` is |native row - native
pass|, two computations of the same loss that differ only in rounding; ``reconstruction_table`` reports the largest
and flags conditions whose change of the loss is at or below it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .passages import as_passages
from .tail_precision import comparison_model, full_run, full_run_start

RANKS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Splice:
    """Replace the states of ``heads`` ([batch, len(heads), d_k, d_v]) by ``fn`` of them."""

    heads: tuple[int, ...]
    fn: Callable[[Tensor], Tensor]


def truncate_rank(states: Float[Tensor, "*batch d_k d_v"], rank: int) -> Float[Tensor, "*batch d_k d_v"]:
    """The rank-r truncation of each matrix from its SVD (fp64 inside); ``rank >= min(d_k, d_v)`` returns the matrix
    itself (up to rounding)."""
    u, s, vh = torch.linalg.svd(states.double(), full_matrices=False)
    r = min(rank, s.shape[-1])
    return ((u[..., :, :r] * s[..., None, :r]) @ vh[..., :r, :]).to(states.dtype)


def svd_splice(rank: int, heads: Sequence[int]) -> Splice:
    """Each of ``heads``' states replaced by its rank-``rank`` truncation."""
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    return Splice(tuple(heads), lambda states: truncate_rank(states, rank))


def sae_splice(saes: dict[int, object]) -> Splice:
    """Each head's state replaced by the reconstruction of its own SAE, ``{head: sae}`` (anything with ``encode`` and
    ``decode`` on the flattened ``d_k * d_v`` state: a WriteSAE or a flat SAELens SAE)."""
    if not saes:
        raise ValueError("sae_splice needs at least one {head: sae}")
    heads = tuple(sorted(saes))

    def fn(states: Tensor) -> Tensor:  # [batch, heads, d_k, d_v]
        out = torch.empty_like(states)
        for i, h in enumerate(heads):
            sae = saes[h]
            flat = states[:, i].flatten(1).to(sae.device, sae.dtype)
            out[:, i] = sae.decode(sae.encode(flat)).to(states).reshape(states[:, i].shape)
        return out

    return Splice(heads, fn)


def identity_splice(heads: Sequence[int]) -> Splice:
    """Writes the state back unchanged (a check: the loss must equal the native one)."""
    return Splice(tuple(heads), lambda states: states.clone())


def apply_splice(state: Tensor, splice: Splice) -> Tensor:
    """A new [batch, head, d_k, d_v] tensor: ``state`` with the splice's heads replaced."""
    heads = torch.as_tensor(splice.heads, dtype=torch.long, device=state.device)
    out = state.clone()
    out[:, heads] = splice.fn(state[:, heads]).to(state.dtype)
    return out


@torch.no_grad()
def reconstruction_sweep(model, layer: int, tokens, conditions: dict[str, Splice], *, prefix_len: int | None = None,
                         passage_batch_size: int = 8, row_batch_size: int = 64, precision: str = "float32",
                         progress: bool = True) -> pd.DataFrame:
    """Suffix losses under each splice; one row per (passage, condition), the condition ``"native"`` (the unspliced
    row) first: ``nll`` (mean over the suffix's predicted tokens, nats), ``tokens`` and the passage's ``floor``
    (|native row - native pass|, nats). ``prefix_len`` defaults to half the passage length (the authors' 512 of
    1,024). ``precision``: ``"float32"`` (the layers from the edited one on in float32) or ``"model"``."""
    tokens = as_passages(model, tokens)
    n_passages, n_pos = tokens.shape
    prefix_len = n_pos // 2 if prefix_len is None else prefix_len
    if not 1 <= prefix_len <= n_pos - 2:
        raise ValueError(f"prefix_len must leave a prefix and a suffix of at least 2 tokens: 1..{n_pos - 2}, got "
                         f"{prefix_len}")
    _check_conditions(model, layer, conditions)
    if row_batch_size < 1:
        raise ValueError(f"row_batch_size must be positive, got {row_batch_size}")
    start_layer = full_run_start(model, layer)
    runner = comparison_model(model, start_layer, precision)  # float32 from start_layer on (or the model itself)
    names = ["native", *conditions]
    rows = []
    with full_run(model, runner, start_layer):
        for start in tqdm(range(0, n_passages, passage_batch_size), desc="reconstruction sweep", disable=not progress):
            batch = tokens[start : start + passage_batch_size]
            prefix, suffix = batch[:, :prefix_len], batch[:, prefix_len:]
            cache = runner.empty_cache()
            runner(prefix, cache=cache, return_type=None)
            pass_nll, streams = _native_suffix(runner, layer, suffix, cache.copy())
            nll = _spliced_rows(runner, layer, conditions, names, cache, streams, suffix, row_batch_size)
            floor = (nll["native"] - pass_nll).abs()
            for i in range(len(batch)):
                for name in names:
                    rows.append({"passage": start + i, "condition": name, "nll": float(nll[name][i]),
                                 "tokens": suffix.shape[1] - 1, "floor": float(floor[i])})
    return pd.DataFrame(rows)


def _spliced_rows(runner, layer: int, conditions: dict[str, Splice], names: list[str], cache, streams, suffix,
                  row_batch_size: int) -> dict[str, Tensor]:
    """The suffix loss [batch] (fp64, CPU) of every name (``"native"``: no splice) for each passage of the batch: rows
    (passage, name), passage-major, run from ``layer`` in batches of at most ``row_batch_size`` rows that hold whole
    passages whenever ``row_batch_size`` allows (a passage's rows then share one batch: one computation)."""
    n = suffix.shape[0]
    pairs = [(name, i) for i in range(n) for name in names]
    per_batch = row_batch_size // len(names) * len(names) or row_batch_size
    out = {name: torch.empty(n, dtype=torch.float64) for name in names}
    for lo in range(0, len(pairs), per_batch):
        piece = pairs[lo : lo + per_batch]
        passages = torch.tensor([i for _, i in piece])
        rows_cache = cache.select(passages)
        state = rows_cache.layers[layer]["state"]
        for name in dict.fromkeys(name for name, _ in piece):
            if name == "native":
                continue
            at = torch.tensor([j for j, (n_, _) in enumerate(piece) if n_ == name], device=state.device)
            state[at] = apply_splice(state[at], conditions[name])
        run = {key: x[passages.to(x.device)] for key, x in streams.items()}
        carried = {key: run[key] for key in runner.carried_streams} if layer > 0 else {}
        final = runner(run["resid"], start_at_layer=layer, stop_at_layer=runner.cfg.n_layers, cache=rows_cache,
                       **carried)  # [rows, suffix, d_model]
        nll = suffix_nll(runner, final, suffix[passages.to(suffix.device)])
        for j, (name, i) in enumerate(piece):
            out[name][i] = nll[j]
    return out


def _native_suffix(model, layer: int, suffix: Tensor, cache) -> tuple[Tensor, dict[str, Tensor]]:
    """The native suffix run from the prefix cache: its mean loss per passage [batch] (fp64, CPU) and the streams a run
    from ``layer`` needs (the residual stream entering it and the family's carried streams)."""
    names = {"resid": f"blocks.{layer}.hook_resid_pre", **model.carried_streams}
    kept: dict[str, Tensor] = {}
    hooks = [(hook, lambda x, hook, key=key: kept.__setitem__(key, x)) for key, hook in names.items()]
    with model.hooks(fwd_hooks=hooks):
        final = model(suffix, cache=cache, stop_at_layer=model.cfg.n_layers)
    return suffix_nll(model, final, suffix), kept


def suffix_nll(model, final_resid: Tensor, tokens: Tensor, block_elements: int = 1 << 20) -> Tensor:
    """Mean next-token loss per row [rows] (fp64, CPU) from the final residual stream [rows, pos, d_model]: the
    model's ``next_token_loss``, computed a few positions at a time (the logits of a block hold about
    ``block_elements`` numbers: large fresh buffers are slow on CPU)."""
    rows, n_pos = tokens.shape
    targets = tokens[:, 1:]
    total = torch.zeros(rows, dtype=torch.float64)
    step = max(1, block_elements // (rows * model.cfg.d_vocab))
    for lo in range(0, n_pos - 1, step):
        hi = min(lo + step, n_pos - 1)
        logits = model.unembed(model.ln_final(final_resid[:, lo:hi])).float()  # [rows, block, d_vocab]
        nll = F.cross_entropy(logits.flatten(0, 1), targets[:, lo:hi].flatten(), reduction="none")
        total += nll.view(rows, hi - lo).double().sum(-1).cpu()
    return total / (n_pos - 1)


def _check_conditions(model, layer: int, conditions: dict[str, Splice]) -> None:
    recurrent = [i for i, block in enumerate(model.blocks) if hasattr(block, "mixer")]
    if layer not in recurrent:
        raise ValueError(f"layer {layer} is not a recurrent layer of this model; recurrent layers: {recurrent}")
    if "native" in conditions:
        raise ValueError("'native' is the unedited run, always included: name the conditions otherwise")
    for name, splice in conditions.items():
        bad = [h for h in splice.heads if not 0 <= h < model.cfg.n_heads]
        if bad or not splice.heads:
            raise ValueError(f"condition {name!r}: heads {list(splice.heads)} must be a non-empty subset of "
                             f"0..{model.cfg.n_heads - 1}")


def reconstruction_table(per_passage: pd.DataFrame) -> pd.DataFrame:
    """Per condition: passages, token-weighted mean suffix loss, perplexity ``exp(loss)``, and the perplexity change
    against ``native`` in percent (the paper's PPL delta). With a ``floor`` column (sweeps since #18) also ``floor``,
    the run's numerical floor (the largest per-passage floor, nats), and ``below_floor`` (1 where the condition's
    loss differs from the native one by at most the floor: a change the arithmetic does not resolve; 0 for native)."""
    weighted = per_passage.assign(total=per_passage["nll"] * per_passage["tokens"])
    grouped = weighted.groupby("condition", sort=False)
    table = pd.DataFrame({"passages": grouped.size(), "loss": grouped["total"].sum() / grouped["tokens"].sum()})
    table["ppl"] = np.exp(table["loss"])
    table["ppl_change_pct"] = 100 * (table["ppl"] / table.loc["native", "ppl"] - 1)
    if "floor" in per_passage.columns:
        floor = float(per_passage["floor"].max())
        table["floor"] = floor
        below = (table["loss"] - table.loc["native", "loss"]).abs() <= floor
        table["below_floor"] = np.where(table.index == "native", 0, below.astype(np.int64))
    return table.reset_index()


def standard_conditions(model, heads: Sequence[int], saes: dict[str, dict[int, object]] | None = None,
                        ranks: Sequence[int] = RANKS) -> dict[str, Splice]:
    """The paper's sweep on ``heads``: each named SAE set (``{"writesae": {head: sae}, "flat": {...}}``) and the rank-r
    truncations for the ranks below ``min(d_k, d_v)`` (larger ones are the state itself)."""
    conditions = {name: sae_splice(by_head) for name, by_head in (saes or {}).items()}
    for name, splice in conditions.items():
        if set(splice.heads) != set(heads):
            raise ValueError(f"{name!r} has SAEs for heads {list(splice.heads)}, the sweep edits heads {list(heads)}")
    full = min(model.cfg.d_k, model.cfg.d_v)
    for rank in ranks:
        if rank < full:
            conditions[f"svd_rank_{rank}"] = svd_splice(rank, heads)
    return conditions


def rank_of(condition: str) -> tuple[int, str] | None:
    """``(r, rest)`` for a condition named ``svd_rank_{r}{rest}`` (e.g. ``svd_rank_4`` -> ``(4, "")``,
    ``svd_rank_4_all_heads`` -> ``(4, "_all_heads")``), else None."""
    match = re.fullmatch(r"svd_rank_(\d+)(.*)", condition)
    return (int(match.group(1)), match.group(2)) if match else None
