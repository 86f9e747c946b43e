"""Figures of the closed-form audit (each writes one PNG atomically and returns its path).

    plot_measured_vs_predicted   measured shift against the paper's prediction, one panel per eps (top-1 token)
    plot_r2_by_rank              median R^2 of each predictor against the eval token's rank
    plot_r2_by_horizon           median per-atom R^2 of each predictor against the horizon (top-1 token)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .closed_form_summary import PREDICTORS, AuditSummary
from .plots import _save_png

_LABELS = {"free": "paper, parameter-free G", "fit": "paper, fitted scale", "first_order": "exact first order (JVP)"}


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_measured_vs_predicted(records: pd.DataFrame, path: str | Path, horizon: int | None = None,
                               overwrite: bool = True) -> Path:
    """Scatter of the measured logit shift against the parameter-free prediction at the top-1 eval token, one panel
    per eps (default horizon: the largest audited), with y = x."""
    top = records[records.eval_rank == 1]
    if top.empty:
        raise ValueError("the records are empty: nothing to plot")
    horizon = int(top.horizon.max()) if horizon is None else horizon
    top = top[top.horizon == horizon]
    eps_values = sorted(top.eps.unique())
    figure = _figure(3.2 * len(eps_values), 3.2)
    axes = figure.subplots(1, len(eps_values), squeeze=False)[0]
    for ax, eps in zip(axes, eps_values):
        part = top[top.eps == eps]
        ax.scatter(part.predicted, part.measured, s=4, alpha=0.4, color="tab:blue", linewidths=0)
        low = float(np.nanmin([part.predicted.min(), part.measured.min()]))
        high = float(np.nanmax([part.predicted.max(), part.measured.max()]))
        ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
        ax.set_title(f"eps = {eps:g}")
        ax.set_xlabel("predicted shift (paper)")
    axes[0].set_ylabel(f"measured shift (h = {horizon})")
    return _save_png(figure, path, overwrite)


def plot_r2_by_rank(summary: AuditSummary, path: str | Path, overwrite: bool = True) -> Path:
    """Median R^2 over atoms against the eval token's rank, one panel per eps, one line per predictor and horizon
    (R^2 below -1 is drawn at -1)."""
    table = summary.by_rank
    if table.empty:
        raise ValueError("no cells to plot")
    eps_values = sorted(table.eps.unique())
    figure = _figure(3.4 * len(eps_values), 3.6)
    axes = figure.subplots(1, len(eps_values), squeeze=False, sharey=True)[0]
    horizons = sorted(table.horizon.unique())
    styles = {h: ["-", "--", ":", "-."][i % 4] for i, h in enumerate(horizons)}
    colours = {"free": "tab:blue", "fit": "tab:orange", "first_order": "tab:green"}
    for ax, eps in zip(axes, eps_values):
        for predictor in PREDICTORS:
            for horizon, part in table[table.eps == eps].groupby("horizon"):
                ax.plot(part.eval_rank, part[f"r2_{predictor}"].clip(lower=-1.0), styles[horizon],
                        color=colours[predictor], label=f"{_LABELS[predictor]}, h = {horizon}")
        ax.set_title(f"eps = {eps:g}")
        ax.set_xlabel("eval token rank")
        ax.set_ylim(-1.05, 1.05)
    axes[0].set_ylabel("median R^2 over atoms")
    axes[-1].legend(fontsize=5, ncol=1)
    return _save_png(figure, path, overwrite)


def plot_r2_by_horizon(summary: AuditSummary, path: str | Path, overwrite: bool = True) -> Path:
    """Median per-atom R^2 (top-1 token) against the horizon, with the IQR as error bars, one line per predictor."""
    table = summary.headline
    if table.empty:
        raise ValueError("no cells to plot")
    figure = _figure(5.0, 3.6)
    ax = figure.subplots()
    for predictor, part in table.groupby("predictor"):
        part = part.sort_values("horizon")
        error = np.vstack([part.median_per_atom - part.iqr_low, part.iqr_high - part.median_per_atom])
        ax.errorbar(part.horizon, part.median_per_atom, yerr=error, marker="o", capsize=3, label=_LABELS[predictor])
    ax.set_xlabel("horizon h = t - t0 (tokens)")
    ax.set_ylabel("median per-atom R^2 (top-1 token)")
    ax.legend(fontsize=7)
    return _save_png(figure, path, overwrite)
