"""One row per finished run (CSV and Parquet) and a layer x head heatmap of the win rate per variant."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .layout import write_atomically

COLUMNS = ["run", "layer", "head", "variant", "architecture", "rank", "d_sae", "k", "seed", "mse",
           "explained_variance", "l0", "dead_latents", "dead_fraction", "n_firings", "win_rate", "win_low", "win_high",
           "strict_chain_rate", "strict_chain_low", "strict_chain_high", "note"]


def run_row(run, metrics: dict, summary, n_dead: int | None, note: str = "") -> dict:
    """The table row of one run: held-out reconstruction metrics, dead latents (SAELens' count over the last
    training window), and the substitution test's win rate and strict chain with their Wilson 95 % intervals
    (NaN when the test found no firings; ``note`` says why)."""
    variant = run.variant
    row = dict(run=run.name, layer=run.layer, head=run.head, variant=variant.name, architecture=variant.architecture,
               rank=variant.rank, d_sae=variant.d_sae,
               k=variant.k if variant.architecture != "jumprelu" else math.nan,  # JumpReLU has no k
               seed=run.seed,
               mse=metrics.get("mse", math.nan), explained_variance=metrics.get("explained_variance", math.nan),
               l0=metrics.get("l0", math.nan),
               dead_latents=n_dead if n_dead is not None else math.nan,
               dead_fraction=n_dead / variant.d_sae if n_dead is not None else math.nan,
               n_firings=0, win_rate=math.nan, win_low=math.nan, win_high=math.nan, strict_chain_rate=math.nan,
               strict_chain_low=math.nan, strict_chain_high=math.nan, note=note)
    if summary is not None:
        row.update(n_firings=summary.n_firings, win_rate=summary.win.rate, win_low=summary.win.low,
                   win_high=summary.win.high, strict_chain_rate=summary.strict_chain.rate,
                   strict_chain_low=summary.strict_chain.low, strict_chain_high=summary.strict_chain.high)
    return row


def collect(runs_folder: Path, run_order: list[str]) -> pd.DataFrame:
    """The table of the finished runs (their ``row.json``), in the sweep's order."""
    rows = []
    for name in run_order:
        path = Path(runs_folder) / name / "row.json"
        if path.is_file():
            rows.append(json.loads(path.read_text(encoding="utf-8")))
    return pd.DataFrame(rows, columns=COLUMNS)


def save_table(table: pd.DataFrame, folder: Path) -> tuple[Path, Path]:
    folder = Path(folder)
    csv, parquet = folder / "results.csv", folder / "results.parquet"
    write_atomically(csv, table.to_csv(index=False))
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    write_atomically(parquet, buffer.getvalue())
    return csv, parquet


def win_rate_grid(table: pd.DataFrame, variant: str, layers: list[int], heads: list[int]) -> np.ndarray:
    """[layer, head] mean win rate over the variant's seeds; NaN where no run of the cell has one."""
    grid = np.full((len(layers), len(heads)), np.nan)
    rows = table[table["variant"] == variant]
    means = rows.groupby(["layer", "head"])["win_rate"].mean()
    for (layer, head), value in means.items():
        if layer in layers and head in heads:
            grid[layers.index(layer), heads.index(head)] = value
    return grid


def plot_heatmap(grid: np.ndarray, layers: list[int], heads: list[int], title: str, path: Path) -> Path:
    """Win rate per cell (0.5: chance; blank: no result), one PNG, written atomically."""
    figure = Figure(figsize=(max(6.0, 0.45 * len(heads) + 2.5), max(3.0, 0.45 * len(layers) + 1.8)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(heads)), [str(h) for h in heads])
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(title)
    if grid.size <= 400:
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if np.isfinite(grid[i, j]):
                    axes.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axes, label="win rate")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, buffer.getvalue())
    return path


def save_heatmaps(table: pd.DataFrame, variants: list[str], layers: list[int], heads: list[int],
                  folder: Path) -> list[Path]:
    return [plot_heatmap(win_rate_grid(table, name, layers, heads), layers, heads,
                         f"{name}: win rate (KL atom < KL delete),\nmean over seeds", Path(folder) / f"{name}.png")
            for name in variants]
