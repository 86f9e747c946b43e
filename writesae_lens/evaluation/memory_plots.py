"""The memory report's figure (``memory.MemoryReport``): one PNG, drawn on a standalone Agg figure and renamed into
place.

Left: the median contribution of a write against the lag, one line per head (colour = layer), with the threshold that
ends a write's memory. Right: each head's memory length against the logit effect of its memory (``kl_memory``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from .memory import MemoryReport
from .records import write_atomically


def plot_memory_report(report: MemoryReport, path: str | Path, title: str | None = None,
                       overwrite: bool = True) -> Path:
    """Write the figure to ``path`` (PNG) and return the path."""
    table, curves = report.table, report.curves
    if table.empty or curves.empty:
        raise ValueError("the memory report is empty: nothing to plot")
    layers = sorted(table["layer"].unique())
    colours = {layer: f"C{i % 10}" for i, layer in enumerate(layers)}
    figure = Figure(figsize=(11, 4.2))
    left, right = figure.subplots(1, 2)
    floor = 1e-4
    for (layer, head), curve in curves.groupby(["layer", "head"]):
        values = np.clip(curve["contribution"].to_numpy(dtype=float), floor, None)
        left.plot(curve["lag"], values, color=colours[layer], alpha=0.8, lw=1.2,
                  label=f"layer {layer}" if head == table[table["layer"] == layer]["head"].min() else None)
    threshold = report.settings.get("threshold", 0.1)
    left.axhline(threshold, color="black", ls="--", lw=1, label=f"{threshold:g}")
    left.set_yscale("log")
    left.set_ylim(floor, 2)
    left.set_xlabel("lag j (tokens after the write)")
    left.set_ylabel("||Phi(s+j, s) W_s|| / ||W_s||  (median over sources)")
    left.set_title("how long a write stays in the state")
    left.legend(fontsize=8)
    for layer in layers:
        rows = table[table["layer"] == layer]
        right.scatter(rows["memory_length"], np.clip(rows["kl_memory"].to_numpy(dtype=float), 1e-6, None),
                      color=colours[layer], label=f"layer {layer}")
        for r in rows.itertuples():
            right.annotate(f"{r.layer}.{r.head}", (r.memory_length, max(r.kl_memory, 1e-6)), fontsize=7,
                           xytext=(3, 2), textcoords="offset points")
    right.set_xscale("log")
    right.xaxis.set_major_formatter(ScalarFormatter())
    right.xaxis.set_minor_formatter(NullFormatter())
    right.set_yscale("log")
    right.set_xlabel(f"memory length (first lag below {threshold:g}, median; {report.settings.get('max_lag', '')} + 1 "
                     "= never)")
    right.set_ylabel("KL when the state is cut to the current write (nats/token)")
    right.set_title("memory length and what the memory does to the logits")
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 0.95) if title else None)
    FigureCanvasAgg(figure)
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=130),
                            overwrite=overwrite)
