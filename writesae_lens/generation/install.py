"""The three-position install (paper section 6.3): write a target token's direction into one head's state at three
consecutive cache positions and count how often greedy decoding then emits the token.

Per prompt, window and target T (drawn per rank class, ``targets.py``) and magnitude m, at the window's positions
s = t, t+1, t+2 (all in the prompt; window w ends w tokens before the prompt's last):

    S_s <- S_s + m |beta_s k_s v_s^T|_F  k_s/|k_s|  v_T*^T          after the read at s  (``edits.CacheEdit``)

with ``v_T* = W_O[h]^T W_U[T] / |.|`` (``directions.py``; decisions: the norm reference is the native write
``beta k v^T``, the key side the unit write key). Then 20 greedy tokens. Controls: the native continuation, and a
matched-norm random direction (a Gaussian unit vector in place of v_T*, one per prompt, window and m, shared by
that prompt's targets). Every edit window lies before the prompt's last token, so the first generated token is the
first affected step: its rank and log-prob of T are recorded for the edited, native and random rows.

All rows (native, edited, random) are rows of the batched engine (``engine.generate_rows``), with the layers from
the edited one on in float32 whatever the model's dtype (issue #18). The native reference of the first-step rank and
log-prob (``native_rank``, ``native_logp``, so the ``lift``) is an unedited row of the same call as the edited and
random rows (one per prompt): the same computation. ``native_pass_logp`` is the same log-prob from the native
continuation run (another call, other batches); ``floor`` = |native_logp - native_pass_logp|, two computations of
the same number that differ only in rounding. The run's floor is the largest; the summary reports it and how many
trials' |lift| is at or below it (``below_floor``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..evaluation.stats import wilson_interval
from .directions import target_directions
from .edits import CacheEdit
from .engine import generate_rows
from .stats import mcnemar_exact
from .targets import TargetClass, check_classes, pick_targets


@dataclass(frozen=True)
class InstallSettings:
    multipliers: tuple[float, ...] = (1.5, 3.0, 6.0)
    n_windows: int = 5
    window: int = 3
    max_new_tokens: int = 20
    targets_per_class: int = 2
    seed: int = 2026
    random_control: bool = True


RECORD_COLUMNS = ["prompt", "window", "first_position", "target_class", "target", "m", "native_rank", "edited_rank",
                  "random_rank", "native_logp", "edited_logp", "random_logp", "lift", "rank_shift", "rank_improved",
                  "included", "native_included", "random_included", "direction_norm", "native_pass_logp", "floor",
                  "below_floor"]


def window_positions(length: int, settings: InstallSettings) -> list[list[int]]:
    """The cache positions of each window: window w is the ``window`` positions ending ``w + 1`` tokens before the
    prompt's end, so its last edit is read before the first generated token."""
    return [list(range(length - 1 - w - settings.window, length - 1 - w)) for w in range(settings.n_windows)]


@dataclass
class InstallPlan:
    """The rows of one install run before they are generated: the native run, the targets and every batched row
    (``rows`` prompts, ``edits``, ``watch`` [rows, n_watch], ``meta`` (kind, prompt, window, m, target index))."""

    native: object
    targets: pd.DataFrame
    norms: Tensor
    rows: list
    edits: list
    watch: Tensor
    meta: list
    by_prompt: dict


@torch.no_grad()
def install_trials(model, layer: int, head: int, prompts: list[Tensor], classes: list[TargetClass],
                   settings: InstallSettings = InstallSettings(), *, batch_size: int = 256,
                   progress: bool = False, precision: str = "float32") -> pd.DataFrame:
    """One record per (prompt, window, target, m) with the columns ``RECORD_COLUMNS``. ``precision``: that of the
    layers from ``layer`` on (``engine.generate_rows``)."""
    prompts = [torch.as_tensor(p).long().cpu() for p in prompts]
    plan = plan_install(model, layer, head, prompts, classes, settings, batch_size=batch_size, precision=precision)
    result = generate_rows(model, plan.rows, max_new_tokens=settings.max_new_tokens, edits=plan.edits,
                           watch=plan.watch, watch_steps=1, batch_size=batch_size, progress=progress,
                           precision=precision, tail_from=layer)
    return _records(plan.targets, prompts, settings, plan.native, result, plan.meta, plan.by_prompt, plan.norms)


@torch.no_grad()
def plan_install(model, layer: int, head: int, prompts: list[Tensor], classes: list[TargetClass],
                 settings: InstallSettings = InstallSettings(), *, batch_size: int = 256,
                 precision: str = "float32") -> InstallPlan:
    """Check the input, run the native continuations, pick the targets and build every edited and control row."""
    prompts = [torch.as_tensor(p).long().cpu() for p in prompts]
    check_classes(classes, model.cfg.d_vocab)
    _check_settings(settings)
    needed = settings.window + settings.n_windows
    for i, p in enumerate(prompts):
        if p.dim() != 1 or len(p) < needed:
            raise ValueError(f"prompt {i} has {len(p)} tokens: {settings.n_windows} windows of {settings.window} "
                             f"positions before the last token need at least {needed}; the positions would lie past "
                             "the prompt")
    native = generate_rows(model, prompts, max_new_tokens=settings.max_new_tokens, keep_first_logprobs=True,
                           batch_size=batch_size, precision=precision, tail_from=layer)
    special = set(getattr(model.tokenizer, "all_special_ids", []) or []) if model.tokenizer is not None else set()
    targets = pick_targets(native.first_logprobs, prompts, classes, settings.targets_per_class, settings.seed, special)
    if targets.empty:
        raise ValueError("no target token falls in any class's rank window for any prompt; widen the windows")
    target_ids = torch.tensor(targets["target"].to_numpy())
    directions, norms = target_directions(model, layer, head, target_ids)  # [n_targets, d_v]
    d_v = model.cfg.d_v

    rows, edits, watch, meta = [], [], [], []
    by_prompt = {p: group.index.to_numpy() for p, group in targets.groupby("prompt")}
    n_watch = int(max(len(v) for v in by_prompt.values()))
    for p, target_rows in by_prompt.items():
        ids = [int(target_ids[i]) for i in target_rows]
        rows.append(prompts[p])  # the native reference: an unedited row of the same call
        watch.append(ids + [-1] * (n_watch - len(ids)))
        meta.append(("native", p, None, None, None))
        windows = window_positions(len(prompts[p]), settings)
        for w, positions in enumerate(windows):
            for m in settings.multipliers:
                for i in target_rows:
                    row = len(rows)
                    rows.append(prompts[p])
                    edits += [CacheEdit(row, s, layer, head, value=directions[i].cpu(), scale=m, relative=True)
                              for s in positions]
                    watch.append([int(target_ids[i])] + [-1] * (n_watch - 1))
                    meta.append(("edited", p, w, m, i))
                if settings.random_control:
                    generator = torch.Generator().manual_seed(_seed(settings.seed, p, w, m))
                    direction = torch.randn(d_v, generator=generator)
                    row = len(rows)
                    rows.append(prompts[p])
                    edits += [CacheEdit(row, s, layer, head, value=direction / direction.norm(), scale=m,
                                        relative=True) for s in positions]
                    ids = [int(target_ids[i]) for i in target_rows]
                    watch.append(ids + [-1] * (n_watch - len(ids)))
                    meta.append(("random", p, w, m, None))
    return InstallPlan(native, targets, norms, rows, edits, torch.tensor(watch), meta, by_prompt)


def _records(targets, prompts, settings, native, result, meta, by_prompt, norms) -> pd.DataFrame:
    random_rows = {(p, w, m): r for r, (kind, p, w, m, _) in enumerate(meta) if kind == "random"}
    native_rows = {p: r for r, (kind, p, _, _, _) in enumerate(meta) if kind == "native"}
    first = native.first_logprobs  # [n_prompts, d_vocab]
    records = []
    for r, (kind, p, w, m, i) in enumerate(meta):
        if kind != "edited":
            continue
        target = int(targets.at[i, "target"])
        slot = list(by_prompt[p]).index(i)
        n = native_rows[p]
        native_logp, native_rank = float(result.watch_logp[n, 0, slot]), int(result.watch_rank[n, 0, slot])
        native_pass_logp = float(first[p, target])
        edited_rank, edited_logp = int(result.watch_rank[r, 0, 0]), float(result.watch_logp[r, 0, 0])
        random_rank = random_logp = math.nan
        random_included = None
        if (p, w, m) in random_rows:
            q = random_rows[(p, w, m)]
            random_rank, random_logp = int(result.watch_rank[q, 0, slot]), float(result.watch_logp[q, 0, slot])
            random_included = bool((result.tokens[q] == target).any())
        records.append(dict(
            prompt=p, window=w, first_position=window_positions(len(prompts[p]), settings)[w][0],
            target_class=targets.at[i, "target_class"], target=target, m=m, native_rank=native_rank,
            edited_rank=edited_rank, random_rank=random_rank, native_logp=native_logp, edited_logp=edited_logp,
            random_logp=random_logp, lift=edited_logp - native_logp, rank_shift=native_rank - edited_rank,
            rank_improved=edited_rank < native_rank, included=bool((result.tokens[r] == target).any()),
            native_included=bool((native.tokens[p] == target).any()), random_included=random_included,
            direction_norm=float(norms[i]), native_pass_logp=native_pass_logp,
            floor=abs(native_logp - native_pass_logp),
        ))
    table = pd.DataFrame(records, columns=RECORD_COLUMNS)
    run_floor = float(table["floor"].max()) if len(table) else math.nan
    table["below_floor"] = (table["lift"].abs() <= run_floor).astype(int)
    return table


def summarize_install(records: pd.DataFrame) -> pd.DataFrame:
    """Per (class, m) and pooled per m: inclusion (edited, native, random) with Wilson 95% intervals, the share of
    trials whose rank improved, median first-step lift and rank shift, and exact McNemar tests edited vs native and
    edited vs random."""
    if records.empty:
        raise ValueError("no install records to summarise")
    groups = [(c, m, g) for (c, m), g in records.groupby(["target_class", "m"], sort=True)]
    groups += [("pooled", m, g) for m, g in records.groupby("m", sort=True)]
    rows = []
    for c, m, g in groups:
        n = len(g)
        row = dict(target_class=c, m=m, n=n)
        for name, column in (("edited", "included"), ("native", "native_included"), ("random", "random_included")):
            values = g[column].dropna().astype(bool)
            if len(values):
                low, high = wilson_interval(int(values.sum()), len(values))
                row.update({f"{name}_inclusion": values.mean(), f"{name}_low": low, f"{name}_high": high})
            else:
                row.update({f"{name}_inclusion": math.nan, f"{name}_low": math.nan, f"{name}_high": math.nan})
        row["rank_improved"] = g["rank_improved"].mean()
        row["median_lift"] = float(np.median(g["lift"]))
        row["median_rank_shift"] = float(np.median(g["rank_shift"]))
        if "floor" in g.columns:  # records saved before #18 have none
            floor = float(records["floor"].max())  # the run's floor
            row.update(floor=floor, below_floor=int((g["lift"].abs() <= floor).sum()))
        vs_native = mcnemar_exact(g["included"].to_numpy(bool), g["native_included"].to_numpy(bool))
        row.update(p_vs_native=vs_native.p_value, only_edited_vs_native=vs_native.only_first,
                   only_native=vs_native.only_second)
        paired = g.dropna(subset=["random_included"])
        if len(paired):
            vs_random = mcnemar_exact(paired["included"].to_numpy(bool), paired["random_included"].to_numpy(bool))
            row.update(p_vs_random=vs_random.p_value)
        else:
            row.update(p_vs_random=math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def format_install_summary(summary: pd.DataFrame) -> str:
    lines = ["Three-position install: target inclusion in the greedy continuation (Wilson 95%)",
             f"  {'class':<10} {'m':>4} {'n':>5}  {'edited':<22} {'native':<22} {'random':<22} "
             f"{'rank up':>7} {'lift':>7} {'rank shift':>10} {'p(nat)':>8} {'p(rand)':>8}"]
    def pct(r, k: str) -> str:
        if math.isnan(r[f"{k}_inclusion"]):
            return "-"
        return f"{100 * r[f'{k}_inclusion']:5.1f}% [{100 * r[f'{k}_low']:4.1f}, {100 * r[f'{k}_high']:5.1f}]"

    for _, r in summary.iterrows():
        lines.append(f"  {r.target_class:<10} {r.m:>4g} {r.n:>5d}  {pct(r, 'edited'):<22} {pct(r, 'native'):<22} "
                     f"{pct(r, 'random'):<22} {100 * r.rank_improved:6.1f}% {r.median_lift:+7.3f} "
                     f"{r.median_rank_shift:>+10.1f} {r.p_vs_native:8.2g} {r.p_vs_random:8.2g}")
    if "floor" in summary.columns and len(summary):
        pooled = summary[summary["target_class"] == "pooled"]
        lines.append(f"  numerical floor (|log p| between two computations of the native distribution): "
                     f"{summary['floor'].iloc[0]:.3g}; trials with |lift| at or below it: "
                     f"{int(pooled['below_floor'].sum())} of {int(pooled['n'].sum())}")
    return "\n".join(lines)


def plot_inclusion(summary: pd.DataFrame, path) -> None:
    """Target inclusion against m, one line per class (edited solid, native dotted), with Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for c, g in summary.groupby("target_class", sort=False):
        g = g.sort_values("m")
        line = ax.errorbar(g["m"], 100 * g["edited_inclusion"],
                           yerr=[100 * (g["edited_inclusion"] - g["edited_low"]),
                                 100 * (g["edited_high"] - g["edited_inclusion"])], marker="o", capsize=3, label=c)
        ax.plot(g["m"], 100 * g["native_inclusion"], linestyle=":", color=line[0].get_color())
    ax.set_xlabel("magnitude m (times the native write's norm)")
    ax.set_ylabel("target in continuation (%)")
    ax.set_title("Three-position install (dotted: native)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _seed(*parts) -> int:
    return int(np.random.SeedSequence([int(round(float(x) * 1000)) for x in parts]).generate_state(1)[0])


def _check_settings(s: InstallSettings) -> None:
    if not s.multipliers or not all(math.isfinite(float(m)) for m in s.multipliers):
        raise ValueError(f"multipliers must be finite numbers, got {s.multipliers!r}")
    for name in ("n_windows", "window", "max_new_tokens", "targets_per_class"):
        value = getattr(s, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
