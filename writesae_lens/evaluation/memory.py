"""How long each recurrent head keeps what it writes, and how much its state matters to the next-token logits.

``memory_report(model, tokens)`` measures, per head of every recurrent layer, on token passages ``[n, n_pos]``:

- **decay**: the per-token retention factor ``a_t = exp(decay_t)`` of ``blocks.{l}.mixer.hook_decay``, its
  10 / 50 / 90 % quantiles over tokens (and, for RWKV-7, whose decay is per key channel, over tokens and key channels).
- **write share**: ``||beta_t k_t v_t^T||_F / ||S_t||_F``, how much of the state after the write at t is that write
  (median over tokens). 1 means the head holds only the current token.
- **memory length**: the write at a source position s is propagated alone through the head's own transitions (every
  native write of the layer deleted, the write at s added back after the read at s, ``hook_post_read_add``); the
  contribution at lag j is ``||Phi(s + j, s) W_s||_F / ||W_s||_F`` with ``Phi`` the product of the transitions. For a
  scalar decay that is the product of the decays; the delta rule's erase and RWKV-7's per-channel decay and erase are
  included because the model's own recurrence computes it. The memory length of a source is the first lag at which
  the contribution falls below ``threshold`` (10 %); the table gives its median over sources (``max_lag + 1`` when
  the contribution never falls below it within ``max_lag``: see ``memory_censored``).
- **logit effect**: mean ``KL(p_model || p_edited)`` (nats per token) when the head's state is replaced at every read by
  zero (``kl_zero``: everything the head reads) or by the current write alone (``kl_memory``: what the head's memory
  of earlier tokens adds). Edits go through ``hook_state``, so the read at t sees the replacement.

Statistics are taken over positions ``>= first_position`` (early positions have little history). The math lives in the
pure functions below (``first_lag_below``, ``write_norms``, ``mean_kl``, ``retention_quantiles``); the hooks only
collect.
``choose_demo_cell`` picks a cell with a long memory that moves the logits, with its reason.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..interventions import add_to_state


@dataclass(frozen=True)
class MemorySettings:
    """``first_position``: positions before it are left out of every statistic; ``max_lag``: the longest lag followed;
    ``sources_per_passage``: source positions per passage for the memory length (evenly spaced in
    ``[first_position, n_pos - max_lag - 1]``); ``threshold``: the contribution that ends a write's memory;
    ``batch_size``: rows per forward pass."""

    first_position: int = 32
    max_lag: int = 128
    sources_per_passage: int = 4
    threshold: float = 0.1
    batch_size: int = 16

    def check(self, n_pos: int) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1); got {self.threshold}")
        for name in ("max_lag", "sources_per_passage", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if self.first_position < 0:
            raise ValueError(f"first_position must be >= 0; got {self.first_position}")
        if n_pos < self.first_position + self.max_lag + 1:
            raise ValueError(f"passages of {n_pos} tokens are too short for first_position={self.first_position} and "
                             f"max_lag={self.max_lag}: they need at least {self.first_position + self.max_lag + 1}")


QUANTILES = (0.1, 0.5, 0.9)  # of the per-token decay: columns decay_q10, decay_q50, decay_q90


@dataclass
class MemoryReport:
    """``table``: one row per (layer, head) (see the module doc for the columns). ``curves``: the median contribution
    of a write at each lag, long format (layer, head, lag, contribution). ``settings``: as measured."""

    table: pd.DataFrame
    curves: pd.DataFrame
    settings: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- pure functions


def first_lag_below(contributions: Tensor, threshold: float) -> Tensor:
    """``contributions`` [n, max_lag] (column j is lag j + 1) -> [n] the first lag (1-based) whose contribution is below
    ``threshold``; ``max_lag + 1`` where none is (censored). Rows holding NaN give NaN."""
    n, max_lag = contributions.shape
    below = contributions < threshold  # [n, max_lag]
    lags = torch.arange(1, max_lag + 1, dtype=torch.float64).expand(n, max_lag)
    first = torch.where(below, lags, torch.full_like(lags, float(max_lag + 1))).min(dim=1).values
    return torch.where(contributions.isnan().any(dim=1), torch.full_like(first, float("nan")), first)


def write_norms(k: Tensor, v: Tensor, beta: Tensor) -> Tensor:
    """Frobenius norm of the write ``beta k v^T``: ``|beta| ||k|| ||v||``. k [..., d_k], v [..., d_v], beta [...]."""
    return beta.double().abs() * k.double().norm(dim=-1) * v.double().norm(dim=-1)


def mean_kl(base_logits: Tensor, edited_logits: Tensor) -> Tensor:
    """``KL(softmax(base) || softmax(edited))`` per row, averaged over the positions: [rows, pos, vocab] -> [rows]."""
    log_p = torch.log_softmax(base_logits.double(), dim=-1)
    log_q = torch.log_softmax(edited_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1)


def retention_quantiles(log_decay: Tensor, quantiles: tuple[float, ...]) -> list[float]:
    """Quantiles of ``exp(log_decay)`` over all its entries (tokens, and key channels for a per-channel decay)."""
    values = log_decay.double().exp().flatten()
    return torch.quantile(values, torch.tensor(quantiles, dtype=torch.float64)).tolist()


def median_curve(contributions: Tensor) -> Tensor:
    """[n, max_lag] -> [max_lag]: the median over rows at each lag, ignoring NaN rows."""
    return contributions.double().nanmedian(dim=0).values


# ---------------------------------------------------------------------------------------------------- measurement


def _hook(layer: int, name: str) -> str:
    return f"blocks.{layer}.mixer.{name}"


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def source_positions(n_pos: int, settings: MemorySettings) -> list[int]:
    """Evenly spaced source positions in ``[first_position, n_pos - max_lag - 1]`` (distinct, sorted)."""
    last = n_pos - settings.max_lag - 1
    return sorted({int(round(x)) for x in np.linspace(settings.first_position, last, settings.sources_per_passage)})


@torch.no_grad()
def _factors_and_shares(model, tokens: Tensor, layers: list[int], settings: MemorySettings):
    """One unedited pass over ``tokens`` (in batches): per layer the write factors at every cell (for the memory
    runs), the decay quantiles and the median write share per head."""
    names = ("hook_write_k", "hook_write_v", "hook_write_beta", "hook_decay")
    kept = {layer: {name: [] for name in names} for layer in layers}
    state_norms = {layer: [] for layer in layers}
    p0 = settings.first_position

    def keep(layer, name):
        def hook(x: Tensor, hook) -> None:
            kept[layer][name].append(x.detach().float().cpu())
        return hook

    def state_norm(layer):
        def hook(x: Tensor, hook) -> None:  # [batch, pos, head, d_k * d_v]
            state_norms[layer].append(x.detach().double().norm(dim=-1).cpu())
        return hook

    hooks = [(_hook(layer, name), keep(layer, name)) for layer in layers for name in names]
    hooks += [(_hook(layer, "hook_state"), state_norm(layer)) for layer in layers]
    for rows in _batches(len(tokens), settings.batch_size):
        model.run_with_hooks(tokens[rows], fwd_hooks=hooks, stop_at_layer=max(layers) + 1)
    factors, stats = {}, {}
    for layer in layers:
        f = {name: torch.cat(kept[layer][name]) for name in names}
        factors[layer] = f
        w = write_norms(f["hook_write_k"], f["hook_write_v"], f["hook_write_beta"])[:, p0:]  # [n, pos, head]
        s = torch.cat(state_norms[layer])[:, p0:]  # [n, pos, head]
        share = (w / s.clamp_min(torch.finfo(torch.float64).tiny)).flatten(0, 1)  # [cells, head]
        stats[layer] = {
            "decay": [retention_quantiles(f["hook_decay"][:, p0:, h], QUANTILES)
                      for h in range(model.cfg.n_heads)],
            "write_share": share.median(dim=0).values.tolist(),
        }
    return factors, stats


def write_contributions(model, tokens: Tensor, layer: int, settings: MemorySettings | None = None,
                        factors: dict | None = None, progress=None) -> tuple[Tensor, list[tuple[int, int]]]:
    """``(contributions [head, n_sources, max_lag], sources)``: for each (passage, source position) in ``sources``, the
    contribution ``||Phi(s + j, s) W_s||_F / ||W_s||_F`` at lags j = 1..max_lag of the native write ``W_s`` of every
    head, propagated alone (every native write of the layer deleted) through the layer's own transitions. NaN where the
    write is zero. ``factors``: the layer's native write factors from an unedited pass (measured when not given)."""
    settings = settings or MemorySettings()
    settings.check(tokens.shape[1])
    if factors is None:
        factors = _factors_and_shares(model, tokens, [layer], settings)[0][layer]
    with _progress(0, False, "") if progress is None else contextlib.nullcontext(progress) as bar:
        return _contributions(model, tokens, layer, factors, settings, bar)


@torch.no_grad()
def _contributions(model, tokens: Tensor, layer: int, factors: dict, settings: MemorySettings, bar):
    n, n_pos = tokens.shape
    sources = source_positions(n_pos, settings)
    pairs = [(b, s) for b in range(n) for s in sources]
    n_heads, lag = model.cfg.n_heads, settings.max_lag
    out = torch.full((n_heads, len(pairs), lag), float("nan"), dtype=torch.float64)
    k, v, beta = (factors[name] for name in ("hook_write_k", "hook_write_v", "hook_write_beta"))
    for rows in _batches(len(pairs), settings.batch_size):
        chunk = pairs[rows]
        b_idx = torch.tensor([b for b, _ in chunk])
        s_idx = torch.tensor([s for _, s in chunk])
        row_tokens = tokens[b_idx, : int(s_idx.max()) + lag + 1]
        kb, vb, bb = k[b_idx, s_idx], v[b_idx, s_idx], beta[b_idx, s_idx]  # [rows, head, d_k|d_v], [rows, head]
        writes = bb[..., None, None] * kb[..., :, None] * vb[..., None, :]  # [rows, head, d_k, d_v]
        norms = write_norms(kb, vb, bb)  # [rows, head]
        cells = torch.stack([torch.arange(len(chunk)).repeat_interleave(n_heads), s_idx.repeat_interleave(n_heads),
                             torch.arange(n_heads).repeat(len(chunk))], dim=1)  # [rows * head, 3]
        norms_seen: list[Tensor] = []

        def silence(x: Tensor, hook) -> Tensor:  # delete every native write of the layer
            return torch.zeros_like(x)

        def measure(x: Tensor, hook) -> None:  # [rows, pos, head, d_k * d_v]
            norms_seen.append(x.detach().double().norm(dim=-1).cpu())

        hooks = [(_hook(layer, "hook_write_beta"), silence), (_hook(layer, "hook_state"), measure)]
        hooks += add_to_state(layer, cells, writes.flatten(0, 1), timing="after_read")
        model.run_with_hooks(row_tokens, fwd_hooks=hooks, stop_at_layer=layer + 1)
        state = norms_seen[0]  # [rows, pos, head]
        lags = s_idx[:, None] + torch.arange(1, lag + 1)[None]  # [rows, lag]
        along = state[torch.arange(len(chunk))[:, None], lags]  # [rows, lag, head]
        ratio = along / norms[:, None, :].double()
        ratio[(norms == 0)[:, None, :].expand_as(ratio)] = float("nan")
        out[:, rows] = ratio.permute(2, 0, 1)
        bar.update(1)
    return out, pairs


@torch.no_grad()
def _logit_effects(model, tokens: Tensor, layer: int, settings: MemorySettings, base_logits: Tensor, bar) -> dict:
    """Per head: mean KL when the head's state is zero at every read, and when it is only the current write."""
    n = len(tokens)
    n_heads, p0 = model.cfg.n_heads, settings.first_position
    effects = {mode: torch.zeros(n_heads, dtype=torch.float64) for mode in ("kl_zero", "kl_memory")}
    jobs = [(h, b) for h in range(n_heads) for b in range(n)]
    for mode in effects:
        for rows in _batches(len(jobs), settings.batch_size):
            chunk = jobs[rows]
            heads_cpu = torch.tensor([h for h, _ in chunk])
            b_idx = torch.tensor([b for _, b in chunk])
            captured: dict[str, Tensor] = {}

            def capture(name):
                def hook(x: Tensor, hook) -> None:
                    captured[name] = x
                return hook

            def replace(x: Tensor, hook) -> Tensor:  # hook_read [rows, pos, head, d_v]: S_t^T q_t
                # the read of the state S_t replaced by 0 or by the current write: only the reads change, so the
                # edit is made on hook_read (no state is built): (beta k v^T)^T q = beta (k . q) v
                x = x.clone()
                r = torch.arange(len(chunk), device=x.device)
                heads = heads_cpu.to(x.device)
                if mode == "kl_zero":
                    x[r, :, heads] = 0.0
                else:
                    k = captured["hook_write_k"][r, :, heads]  # [rows, pos, d_k]
                    v = captured["hook_write_v"][r, :, heads]  # [rows, pos, d_v]
                    beta = captured["hook_write_beta"][r, :, heads]  # [rows, pos]
                    q = captured["hook_read_q"][r, :, heads]  # [rows, pos, d_k]
                    x[r, :, heads] = ((beta * (k * q).sum(-1))[..., None] * v).to(x.dtype)
                return x

            names = ("hook_write_k", "hook_write_v", "hook_write_beta", "hook_read_q")
            hooks = [(_hook(layer, name), capture(name)) for name in names]
            hooks.append((_hook(layer, "hook_read"), replace))
            logits = model.run_with_hooks(tokens[b_idx], fwd_hooks=hooks)
            kl = mean_kl(base_logits[b_idx, p0:], logits[:, p0:].cpu())  # [rows]
            effects[mode].index_add_(0, heads_cpu, kl)
            bar.update(1)
        effects[mode] /= n
    return effects


def memory_report(model, tokens: Tensor, settings: MemorySettings | None = None, layers: list[int] | None = None,
                  progress: bool = True) -> MemoryReport:
    """The memory report of every head of ``layers`` (default: every recurrent layer) on ``tokens`` [n, n_pos]."""
    settings = settings or MemorySettings()
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        got = getattr(tokens, "shape", tokens)
        raise ValueError(f"tokens must be an integer tensor [n_passages, n_pos]; got {got}")
    settings.check(tokens.shape[1])
    recurrent = list(model.cfg.recurrent_layers)
    layers = recurrent if layers is None else list(layers)
    bad = [layer for layer in layers if layer not in recurrent]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} are not recurrent layers of this model; valid: {recurrent}")
    tokens = tokens.to(model.cfg.device)
    factors, stats = _factors_and_shares(model, tokens, layers, settings)
    with torch.no_grad():
        base_logits = torch.cat([model(tokens[rows]).cpu() for rows in _batches(len(tokens), settings.batch_size)])
    n_pairs = len(tokens) * len(source_positions(tokens.shape[1], settings))
    n_jobs = -(-n_pairs // settings.batch_size) + 2 * -(-len(tokens) * model.cfg.n_heads // settings.batch_size)
    rows, curves = [], []
    with _progress(n_jobs * len(layers), progress, "memory report") as bar:
        for layer in layers:
            contributions, _ = _contributions(model, tokens, layer, factors[layer], settings, bar)
            effects = _logit_effects(model, tokens, layer, settings, base_logits, bar)
            for head in range(model.cfg.n_heads):
                lengths = first_lag_below(contributions[head], settings.threshold)
                valid = lengths[~lengths.isnan()]
                q = stats[layer]["decay"][head]
                row = {"layer": layer, "head": head}
                row.update({f"decay_q{round(100 * p)}": value for p, value in zip(QUANTILES, q)})
                row["write_share"] = stats[layer]["write_share"][head]
                row["memory_length"] = float(valid.median()) if len(valid) else float("nan")
                censored = (valid > settings.max_lag).double().mean() if len(valid) else float("nan")
                row["memory_censored"] = float(censored)
                row["kl_zero"] = float(effects["kl_zero"][head])
                row["kl_memory"] = float(effects["kl_memory"][head])
                rows.append(row)
                curve = median_curve(contributions[head])
                curves += [{"layer": layer, "head": head, "lag": j + 1, "contribution": float(c)}
                           for j, c in enumerate(curve)]
    meta = asdict(settings) | {"n_passages": int(tokens.shape[0]), "n_pos": int(tokens.shape[1]),
                               "model": getattr(model.cfg, "model_name", None)}
    return MemoryReport(pd.DataFrame(rows), pd.DataFrame(curves), meta)


# ---------------------------------------------------------------------------------------------------- choices, text


def choose_demo_cell(model=None, tokens: Tensor | None = None, report: MemoryReport | None = None,
                     settings: MemorySettings | None = None, density: Callable[[int, int], float] | None = None,
                     min_write_share: float = 0.05) -> tuple[int, int, str]:
    """The (layer, head, reason) of a cell worth a demo: among heads whose memory moves the logits at least as much as
    the median head's (``kl_memory``), the one whose writes last longest (median memory length; ties: larger
    ``kl_memory``). Heads whose current write is under ``min_write_share`` of their state (median ``write_share``)
    are left out first: the substitution test replaces the write, and replacing or deleting a write that small
    changes little next to what the state already holds (mamba2-tiny's longest-memory head, whose write is 1 % of
    its state, gave a median KL of 5e-8 for deleting it). ``density(layer, head)``, when given, is a firing density
    in [0, 1] per cell: cells where it is 0 are left out (a TopK SAE fires k features at every position, so its
    density cannot tell cells apart). Pass a computed ``report``, or ``model`` and ``tokens`` to measure one."""
    if not 0.0 <= min_write_share < 1.0:
        raise ValueError(f"min_write_share must be in [0, 1), got {min_write_share!r}")
    if report is None:
        if model is None or tokens is None:
            raise ValueError("choose_demo_cell needs a memory report, or a model and token passages to measure one")
        report = memory_report(model, tokens, settings, progress=False)
    table = report.table.dropna(subset=["memory_length", "kl_memory"])
    n_measured = len(table)
    table = table[table["write_share"] >= min_write_share]
    small_writes = n_measured - len(table)
    if density is not None:
        table = table[[density(int(r.layer), int(r.head)) > 0 for r in table.itertuples()]]
    if table.empty:
        raise ValueError(f"no head has a measured memory length and a write share of at least {min_write_share} "
                         "(and, with density, a firing feature)")
    floor = float(table["kl_memory"].median())
    candidates = table[table["kl_memory"] >= floor].sort_values(["memory_length", "kl_memory"], ascending=False)
    best = candidates.iloc[0]
    layer, head = int(best["layer"]), int(best["head"])
    threshold = report.settings.get("threshold", MemorySettings.threshold)
    length = best["memory_length"]
    max_lag = report.settings.get("max_lag", MemorySettings.max_lag)
    lasting = f"more than {max_lag}" if length > max_lag else f"{length:g}"
    reason = (f"layer {layer} head {head}: a write keeps {threshold:.0%} of its norm for {lasting} tokens (median), "
              f"the longest of the {len(candidates)} heads whose memory moves the logits at least as much as the "
              f"median head (KL {best['kl_memory']:.3f} nats/token when its state is cut to the current write; "
              f"median {floor:.3f}); median per-token decay {best['decay_q50']:.2f}, the current write is "
              f"{best['write_share']:.0%} of its state")
    if small_writes:
        reason += (f" ({small_writes} heads whose current write is under {min_write_share:.0%} of their state were "
                   "left out: replacing such a write changes little)")
    return layer, head, reason


def format_memory_report(report: MemoryReport) -> str:
    """A plain-text table of the report (one line per head) with a header naming the settings."""
    s = report.settings
    lines = [f"memory report: {s.get('n_passages')} passages x {s.get('n_pos')} tokens, positions >= "
             f"{s.get('first_position')}; memory length = first lag with contribution < {s.get('threshold')} "
             f"(median over sources, {s.get('max_lag', 0) + 1} = never within {s.get('max_lag')})",
             "layer head  decay q10/q50/q90   write share  memory length  censored  KL zero  KL memory"]
    for r in report.table.itertuples():
        lines.append(f"{r.layer:5d} {r.head:4d}  {r.decay_q10:5.2f} {r.decay_q50:5.2f} {r.decay_q90:5.2f}   "
                     f"{r.write_share:10.2f}  {r.memory_length:13g}  {r.memory_censored:8.2f}  {r.kl_zero:7.4f}  "
                     f"{r.kl_memory:9.4f}")
    return "\n".join(lines)
