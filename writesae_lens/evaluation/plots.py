"""Figures of the substitution test, drawn from a record table (records.py).

Each function takes the records and an output path, writes one PNG and returns its path. Figures are drawn on a
standalone `matplotlib.figure.Figure` with the Agg canvas (no pyplot state, no display needed) and saved to a
temporary file that is renamed into place, so a PNG is never half-written.

    plot_kl_scatter          log-log KL_delete and KL_random against KL_atom, with y = x   (paper Fig. 3 style)
    plot_log_ratio_density   densities of log10(KL_cond / KL_atom) for delete and random
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from jaxtyping import Float
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from writesae_lens.evaluation.records import kl_column, validate_records, write_atomically

_CONDITION_COLOURS = {"delete": "tab:blue", "random": "tab:red"}


def _kl_arrays(records: pd.DataFrame, reverse_kl: bool) -> dict[str, np.ndarray]:
    table = validate_records(records)
    if len(table) == 0:
        raise ValueError("the record table is empty: nothing to plot")
    arrays = {}
    for condition in ("atom", "delete", "random"):
        name = kl_column(condition, reverse=reverse_kl)
        values = table[name].to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{name} has {int((~np.isfinite(values)).sum())} NaN or infinite values; cannot plot")
        arrays[condition] = values
    return arrays


def _kl_label(reverse_kl: bool) -> str:
    return "KL(p_cond || p_native)" if reverse_kl else "KL(p_native || p_cond)"


def _save_png(figure: Figure, path: str | Path, overwrite: bool) -> Path:
    FigureCanvasAgg(figure)
    return write_atomically(
        path, lambda temporary: figure.savefig(temporary, format="png", dpi=150), overwrite=overwrite
    )


def plot_kl_scatter(
    records: pd.DataFrame,
    path: str | Path,
    *,
    reverse_kl: bool = False,
    title: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Log-log scatter of KL_delete and KL_random (y) against KL_atom (x), one point per firing, with y = x.

    Points above the line are firings where the condition moved the output further than the atom did. Firings
    with a non-positive KL cannot sit on log axes; they are left out and counted in the legend.
    """
    kl = _kl_arrays(records, reverse_kl)
    figure = Figure(figsize=(5.5, 5.0), layout="constrained")
    axes = figure.add_subplot()
    shown_values = []
    for condition in ("random", "delete"):  # delete, the comparison that matters, drawn on top
        visible = (kl["atom"] > 0) & (kl[condition] > 0)
        hidden = int((~visible).sum())
        label = f"{condition} (n = {int(visible.sum())}" + (f", {hidden} with KL <= 0 not shown)" if hidden else ")")
        axes.scatter(kl["atom"][visible], kl[condition][visible], s=6, alpha=0.45, linewidths=0,
                     color=_CONDITION_COLOURS[condition], label=label)  # fmt: skip
        shown_values += [kl["atom"][visible], kl[condition][visible]]
    values = np.concatenate(shown_values)
    if values.size:
        low, high = float(values.min()), float(values.max())
        low, high = (low / 2, high * 2) if low < high else (low / 10, high * 10)
        axes.plot([low, high], [low, high], color="black", linewidth=1, linestyle="--", label="y = x")
        axes.set_xlim(low, high)
        axes.set_ylim(low, high)
    else:  # e.g. a head that keeps nothing of its state: every edit after the read changes nothing, KL exactly 0
        axes.set_xlim(1e-12, 1.0)
        axes.set_ylim(1e-12, 1.0)
        axes.text(0.5, 0.5, "no firing has a positive KL\nin the atom and either condition", ha="center",
                  va="center", transform=axes.transAxes)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel(f"KL_atom   [{_kl_label(reverse_kl)}, nats]")
    axes.set_ylabel("KL_condition [nats]")
    axes.set_title(title or "Condition KL against atom KL, per firing")
    axes.legend(loc="upper left", fontsize="small", markerscale=2)
    return _save_png(figure, path, overwrite)


def gaussian_kde(
    samples: Float[np.ndarray, " sample"], grid: Float[np.ndarray, " point"], *, bandwidth: float | None = None
) -> Float[np.ndarray, " point"]:
    """Gaussian kernel density estimate of `samples` evaluated on `grid`.

        f(x) = (1 / (n h)) Σ_i φ((x - x_i) / h),   φ the standard normal density

    with Silverman's bandwidth h = 0.9 · min(σ, IQR / 1.34) · n^(-1/5) unless `bandwidth` is given (falling back
    to σ, then to 1, when the spread is zero).
    """
    samples = np.asarray(samples, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    if samples.size == 0:
        raise ValueError("gaussian_kde needs at least one sample")
    if bandwidth is None:
        sigma = float(samples.std(ddof=1)) if samples.size > 1 else 0.0
        iqr = float(np.subtract(*np.percentile(samples, [75, 25])))
        spread = min(sigma, iqr / 1.34) if iqr > 0 else sigma
        bandwidth = 0.9 * (spread if spread > 0 else 1.0) * samples.size ** (-0.2)
    density = np.zeros_like(grid)
    chunk = max(1, 2_000_000 // max(grid.size, 1))
    for start in range(0, samples.size, chunk):
        scaled = (grid[None, :] - samples[start : start + chunk, None]) / bandwidth
        density += np.exp(-0.5 * scaled**2).sum(axis=0)
    return density / (samples.size * bandwidth * math.sqrt(2 * math.pi))


def plot_log_ratio_density(
    records: pd.DataFrame,
    path: str | Path,
    *,
    reverse_kl: bool = False,
    bins: int = 60,
    title: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Density of r = log10(KL_cond / KL_atom) for cond = delete and random: a histogram and a Gaussian KDE.

    r > 0 means the condition moved the output further than the atom; the fraction of firings with r > 0 (the
    win rate, for delete) is given in the legend. Firings with a non-positive KL are left out and counted.
    """
    kl = _kl_arrays(records, reverse_kl)
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    log_ratios = {}
    for condition in ("delete", "random"):
        defined = (kl["atom"] > 0) & (kl[condition] > 0)
        log_ratios[condition] = (np.log10(kl[condition][defined] / kl["atom"][defined]), int((~defined).sum()))
    everything = np.concatenate([ratios for ratios, _ in log_ratios.values()])
    if everything.size:
        low, high = float(everything.min()), float(everything.max())
        margin = 0.05 * (high - low) if high > low else 0.5
        grid = np.linspace(low - margin, high + margin, 512)
        for condition, (ratios, hidden) in log_ratios.items():
            if ratios.size == 0:
                continue
            colour = _CONDITION_COLOURS[condition]
            label = f"{condition}/atom: {100 * float((ratios > 0).mean()):.1f}% > 0 (n = {ratios.size}"
            label += f", {hidden} with KL <= 0 left out)" if hidden else ")"
            axes.hist(ratios, bins=bins, range=(grid[0], grid[-1]), density=True, histtype="stepfilled",
                      alpha=0.25, color=colour)  # fmt: skip
            axes.plot(grid, gaussian_kde(ratios, grid), color=colour, linewidth=1.5, label=label)
    axes.axvline(0.0, color="black", linewidth=1, linestyle="--")
    axes.set_xlabel(f"log10(KL_condition / KL_atom)   [{_kl_label(reverse_kl)}]")
    axes.set_ylabel("density")
    axes.set_title(title or "Condition KL relative to atom KL, per firing")
    axes.legend(loc="upper left", fontsize="small")
    return _save_png(figure, path, overwrite)
