"""Figures of the partition and the baselines; each writes one PNG and returns its path (as ``plots.py``).

    plot_cosine_histogram   the alive atoms' median cosines, with the fitted mixture's density and the threshold
    plot_reconstruction     suffix perplexity change per splice: the rank-r truncations as a line, the SAEs as marks
    plot_cosine_ecdfs       the firing-level cosine distributions of several partitions, as empirical CDFs
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .cache_reconstruction import rank_of
from .plots import _save_png


def mixture_density(grid: np.ndarray, weights, means, stds) -> np.ndarray:
    """The density of a 1-D Gaussian mixture on ``grid``."""
    grid = np.asarray(grid, dtype=np.float64)[:, None]
    w, m, s = (np.asarray(x, dtype=np.float64)[None, :] for x in (weights, means, stds))
    return (w * np.exp(-0.5 * ((grid - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))).sum(-1)


def plot_cosine_histogram(atoms: pd.DataFrame, mixtures: pd.DataFrame, path: str | Path, *, tau: float = 0.05,
                          components: int = 2, bins: int = 40, title: str | None = None,
                          overwrite: bool = True) -> Path:
    """Histogram (density) of the alive atoms' median cosines with the ``components``-Gaussian mixture's density and
    the register threshold ``tau``."""
    medians = atoms["median_cos"].dropna().to_numpy()
    if medians.size == 0:
        raise ValueError("no alive atom: nothing to plot")
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    axes.hist(medians, bins=bins, density=True, color="tab:gray", alpha=0.5, label=f"{medians.size} alive atoms")
    low, high = float(medians.min()), float(medians.max())
    margin = 0.05 * (high - low) if high > low else 0.05
    grid = np.linspace(low - margin, high + margin, 400)
    fit = mixtures.loc[mixtures["components"] == components]
    if len(fit):
        row = fit.iloc[0]
        axes.plot(grid, mixture_density(grid, row["weights"], row["means"], row["stds"]), color="tab:blue",
                  label=f"{components}-Gaussian mixture (BIC {row['bic']:.1f})")
    axes.axvline(tau, color="tab:red", linestyle="--", linewidth=1, label=f"register threshold {tau:g}")
    axes.set_xlabel("median signed cosine of the atom with the native write at its firings")
    axes.set_ylabel("density")
    axes.set_title(title or "Register / bundle partition")
    axes.legend(fontsize="small")
    return _save_png(figure, path, overwrite)


def plot_reconstruction(table: pd.DataFrame, path: str | Path, *, title: str | None = None,
                        overwrite: bool = True) -> Path:
    """Suffix perplexity change (%) against the native run: rank-r truncations against r (log2 axis), every other
    condition as a horizontal line (``table`` from ``reconstruction_table``)."""
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    series: dict[str, list[tuple[int, float]]] = {}  # one line per family of truncations (e.g. "_all_heads")
    for condition, value in zip(table["condition"], table["ppl_change_pct"]):
        if rank_of(condition) is not None:
            rank, rest = rank_of(condition)
            series.setdefault(rest, []).append((rank, value))
    for (rest, points), style in zip(series.items(), ("o-", "s--", "^:", "d-.")):
        r, v = zip(*sorted(points))
        axes.plot(r, v, style, color="black", label=f"rank-r truncation of the state{rest.replace('_', ' ')}")
    if series:
        axes.set_xscale("log", base=2)
    colours = iter(["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"])
    for condition, value in zip(table["condition"], table["ppl_change_pct"]):
        if condition != "native" and rank_of(condition) is None:
            axes.axhline(value, color=next(colours, "tab:gray"), linestyle="--", label=f"{condition}: {value:+.3g}%")
    axes.axhline(0.0, color="gray", linewidth=0.8)
    axes.set_xlabel("rank r")
    axes.set_ylabel("suffix perplexity change vs native (%)")
    axes.set_title(title or "Reconstruction spliced into the cache")
    axes.legend(fontsize="small")
    return _save_png(figure, path, overwrite)


def plot_cosine_ecdfs(firings: dict[str, pd.DataFrame], path: str | Path, *, column: str = "cos_beta",
                      title: str | None = None, overwrite: bool = True) -> Path:
    """Empirical CDFs of the firing-level cosines of several partitions (``{label: firings table}``): the curves
    whose largest vertical gap is the KS statistic of each pair."""
    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for label, table in firings.items():
        values = np.sort(table[column].to_numpy(np.float64))
        if values.size == 0:
            raise ValueError(f"group {label!r} has no firings: nothing to plot")
        axes.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                  label=f"{label} ({values.size} firings)")
    axes.set_xlabel(f"signed cosine of the atom with the native write ({column})")
    axes.set_ylabel("share of firings at or below")
    axes.set_title(title or "Firing-level cosines")
    axes.legend(fontsize="small")
    return _save_png(figure, path, overwrite)
