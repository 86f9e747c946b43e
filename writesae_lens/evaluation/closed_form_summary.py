"""The statistics of the closed-form audit: R^2 per cell and predictor, the headline numbers, the sign checks, the
selectivity. Everything is computed from the tables ``closed_form.logit_shift_audit`` returns (or reads back).

A cell is (horizon, atom, eps, eval rank); its R^2 is taken across prompts. Three predictors:

- ``free``: the paper's parameter-free closed form (``predicted``), ``R^2 = 1 - SS_res / SS_tot``;
- ``fit``: the same with one least-squares scale and intercept per cell (the squared Pearson correlation);
- ``first_order``: the exact first-order shift (``first_order``), parameter-free like ``free``.

Headline (per horizon, at eval rank 1, the paper's "top-1 eval token"): per-atom R^2 = the median over its eps cells;
the median, IQR and 10th percentile of those, and the share of (atom, eps) cells above 0.95.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from .logit_shift import fitted_scale, r_squared, r_squared_fitted
from .stats import wilson_interval

PREDICTORS = ("free", "fit", "first_order")
CELL_KEYS = ["horizon", "atom", "eps", "eval_rank"]


@dataclass
class AuditSummary:
    cells: pd.DataFrame  # one row per cell: r2_free, r2_fit, r2_first_order, fitted_scale
    headline: pd.DataFrame  # per (horizon, predictor): median per-atom R^2, IQR, p10, share of cells > 0.95
    by_rank: pd.DataFrame  # per (horizon, eps, eval_rank): median R^2 of each predictor over atoms
    sign_check: pd.DataFrame  # per (horizon, predictor): trials, flips, rate, Wilson upper bound
    sign_prediction: dict  # 6.2
    selectivity: pd.DataFrame  # per (control, k): mean selectivity and its 95% interval


def cell_r_squared(records: pd.DataFrame) -> pd.DataFrame:
    """R^2 of each predictor per cell, across prompts (the records must hold the full grid)."""
    ordered = records.sort_values(CELL_KEYS + ["prompt"], kind="stable")
    n_prompts = ordered["prompt"].nunique()
    if len(ordered) % n_prompts:
        raise ValueError("the records do not hold every prompt of every cell (is this a full audit table?)")
    shape = (len(ordered) // n_prompts, n_prompts)
    measured = ordered["measured"].to_numpy(np.float64).reshape(shape)
    predicted = ordered["predicted"].to_numpy(np.float64).reshape(shape)
    first = ordered["first_order"].to_numpy(np.float64).reshape(shape)
    cells = ordered[CELL_KEYS].iloc[::n_prompts].reset_index(drop=True)
    cells["r2_free"] = r_squared(measured, predicted)
    cells["r2_fit"] = r_squared_fitted(measured, predicted)
    cells["r2_first_order"] = r_squared(measured, first) if np.isfinite(first).all() else np.nan
    cells["fitted_scale"] = fitted_scale(measured, predicted)
    return cells


def _headline(cells: pd.DataFrame) -> pd.DataFrame:
    rows = []
    top = cells[cells.eval_rank == 1]
    for horizon, part in top.groupby("horizon"):
        for predictor in PREDICTORS:
            column = f"r2_{predictor}"
            per_atom = part.groupby("atom")[column].median().dropna().to_numpy()
            values = part[column].dropna().to_numpy()
            if len(per_atom) == 0:
                continue
            rows.append(dict(horizon=horizon, predictor=predictor, atoms=len(per_atom),
                             median_per_atom=float(np.median(per_atom)),
                             iqr_low=float(np.percentile(per_atom, 25)), iqr_high=float(np.percentile(per_atom, 75)),
                             p10=float(np.percentile(per_atom, 10)), cells=len(values),
                             share_above_095=float((values > 0.95).mean())))
    return pd.DataFrame(rows)


def _sign_check(records: pd.DataFrame) -> pd.DataFrame:
    """Sign flips of the measured shift against each parameter-free prediction at eval rank 1 (one trial per prompt,
    atom, eps, horizon; trials where either side is exactly 0 are left out)."""
    rows = []
    top = records[records.eval_rank == 1]
    for horizon, part in top.groupby("horizon"):
        for predictor, column in (("free", "predicted"), ("first_order", "first_order")):
            measured, predicted = np.sign(part["measured"].to_numpy()), np.sign(part[column].to_numpy())
            usable = (measured != 0) & (predicted != 0) & np.isfinite(part[column].to_numpy())
            n = int(usable.sum())
            if n == 0:
                continue
            flips = int((measured[usable] != predicted[usable]).sum())
            rows.append(dict(horizon=horizon, predictor=predictor, trials=n, flips=flips, flip_rate=flips / n,
                             wilson_upper=wilson_interval(flips, n)[1]))
    return pd.DataFrame(rows)


def sign_prediction_summary(trials: pd.DataFrame) -> dict:
    """6.2: agreement of sign(measured) with sign(predicted), its Wilson interval, Pearson r (scipy), the median
    measured / predicted ratio and the pooled parameter-free R^2."""
    if trials.empty:
        return {"trials": 0}
    measured, predicted = trials["measured"].to_numpy(np.float64), trials["predicted"].to_numpy(np.float64)
    agree = int((np.sign(measured) == np.sign(predicted)).sum())
    n = len(trials)
    low, high = wilson_interval(agree, n)
    varying = np.ptp(measured) > 0 and np.ptp(predicted) > 0
    r, p = scipy_stats.pearsonr(predicted, measured) if varying and n > 2 else (math.nan, math.nan)
    nonzero = predicted != 0
    return dict(trials=n, agreement=agree / n, agreement_low=low, agreement_high=high, pearson_r=float(r),
                pearson_p=float(p), median_ratio=float(np.median(measured[nonzero] / predicted[nonzero]))
                if nonzero.any() else math.nan, pooled_r2=float(r_squared(measured, predicted)))


def selectivity_summary(selectivity: pd.DataFrame) -> pd.DataFrame:
    """Mean selectivity (1 - top-K overlap) per control and K with a t interval over (prompt, atom) pairs."""
    rows = []
    for (control, k), part in selectivity.groupby(["control", "k"]):
        values = part["selectivity"].to_numpy(np.float64)
        mean = float(values.mean())
        if len(values) > 1 and values.std() > 0:
            low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=mean, scale=scipy_stats.sem(values))
        else:
            low = high = mean
        rows.append(dict(control=control, k=int(k), pairs=len(values), mean_selectivity=mean, low=float(low),
                         high=float(high), share_above_099=float((values > 0.99).mean())))
    return pd.DataFrame(rows)


def summarize_audit(records: pd.DataFrame, sign_trials: pd.DataFrame, selectivity: pd.DataFrame) -> AuditSummary:
    cells = cell_r_squared(records)
    by_rank = cells.groupby(["horizon", "eps", "eval_rank"])[["r2_free", "r2_fit", "r2_first_order"]].median()
    by_rank = by_rank.reset_index()
    return AuditSummary(cells, _headline(cells), by_rank, _sign_check(records), sign_prediction_summary(sign_trials),
                        selectivity_summary(selectivity) if not selectivity.empty else pd.DataFrame())


def format_audit_summary(summary: AuditSummary, title: str = "Closed-form logit shift") -> str:
    lines = [title]
    lines.append("  R^2 at the top-1 eval token (per-atom R^2 = median over eps; cells = atom x eps)")
    lines.append("    horizon  predictor     atoms  median   IQR               p10      cells > 0.95")
    for row in summary.headline.itertuples():
        lines.append(f"    {row.horizon:<8} {row.predictor:<13} {row.atoms:<6} {row.median_per_atom:+.4f}  "
                     f"[{row.iqr_low:+.3f}, {row.iqr_high:+.3f}]  {row.p10:+.4f}  {row.share_above_095:6.1%} "
                     f"of {row.cells}")
    lines.append("  sign flips of the measured shift against the prediction (top-1 eval token)")
    for row in summary.sign_check.itertuples():
        lines.append(f"    horizon {row.horizon:<4} {row.predictor:<12} {row.flips}/{row.trials} flips "
                     f"({row.flip_rate:.2%}; Wilson 95% upper bound {row.wilson_upper:.2%})")
    sp = summary.sign_prediction
    if sp.get("trials"):
        lines.append(f"  single-position sign prediction (6.2): {sp['agreement']:.1%} of {sp['trials']} trials "
                     f"[{sp['agreement_low']:.1%}, {sp['agreement_high']:.1%}]; Pearson r {sp['pearson_r']:+.3f} "
                     f"(p = {sp['pearson_p']:.2g}); median measured/predicted {sp['median_ratio']:.3g}; "
                     f"pooled R^2 {sp['pooled_r2']:+.3f}")
    if not summary.selectivity.empty:
        lines.append("  selectivity (1 - top-K overlap with a matched-norm control), mean [95% CI]")
        for row in summary.selectivity.itertuples():
            lines.append(f"    {row.control:<11} K={row.k:<3} {row.mean_selectivity:.4f} [{row.low:.4f}, "
                         f"{row.high:.4f}]  (n = {row.pairs})")
    return "\n".join(lines)
