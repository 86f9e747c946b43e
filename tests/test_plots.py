"""Figures of the substitution test (writesae_lens.evaluation.plots): they write real PNGs, atomically."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from writesae_lens.evaluation import plots
from writesae_lens.evaluation import records as rec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_records(n: int = 200, seed: int = 0) -> pd.DataFrame:
    """A plausible record table: log-normal KLs with atom < delete < random on most firings."""
    rng = np.random.default_rng(seed)
    kl_atom = np.exp(rng.normal(-1.0, 1.0, n))
    kl_delete = kl_atom * np.exp(rng.normal(0.5, 0.5, n))
    kl_random = kl_delete * np.exp(rng.normal(0.5, 0.5, n))
    table = pd.DataFrame({name: rng.integers(0, 50, n) for name in rec.INTEGER_COLUMNS})
    for name in rec.FLOAT_COLUMNS:
        table[name] = rng.uniform(0.1, 1.0, n)
    for condition, values in (("atom", kl_atom), ("delete", kl_delete), ("random", kl_random)):
        table[rec.kl_column(condition)] = values
        table[rec.kl_column(condition, reverse=True)] = 1.1 * values
    return table


@pytest.mark.parametrize("plot", [plots.plot_kl_scatter, plots.plot_log_ratio_density], ids=["scatter", "density"])
@pytest.mark.parametrize("reverse_kl", [False, True], ids=["forward", "reverse"])
def test_plot_writes_a_png_and_nothing_else(tmp_path, plot, reverse_kl):
    path = plot(synthetic_records(), tmp_path / "figures" / "figure.png", reverse_kl=reverse_kl)
    assert path == tmp_path / "figures" / "figure.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["figure.png"]


@pytest.mark.parametrize("plot", [plots.plot_kl_scatter, plots.plot_log_ratio_density], ids=["scatter", "density"])
def test_plot_tolerates_zero_kls_and_respects_overwrite(tmp_path, plot):
    table = synthetic_records(50)
    table.loc[:4, "kl_atom"] = 0.0  # cannot be drawn on log axes / in log ratios: left out, not an error
    path = plot(table, tmp_path / "figure.png")
    first = path.read_bytes()
    assert first.startswith(PNG_SIGNATURE)
    with pytest.raises(FileExistsError):
        plot(table, path, overwrite=False)
    assert path.read_bytes() == first
    plot(synthetic_records(50, seed=1), path, title="again")
    assert path.read_bytes() != first


@pytest.mark.parametrize("plot", [plots.plot_kl_scatter, plots.plot_log_ratio_density], ids=["scatter", "density"])
def test_plot_of_a_cell_where_no_edit_changes_anything(tmp_path, plot):
    """A head that keeps nothing of its state gives KL exactly 0 (or -0.0) in every condition: still a figure."""
    table = synthetic_records(30)
    for condition in ("atom", "delete", "random"):
        table[rec.kl_column(condition)] = -0.0
    assert plot(table, tmp_path / "figure.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("plot", [plots.plot_kl_scatter, plots.plot_log_ratio_density], ids=["scatter", "density"])
def test_plot_rejects_empty_and_nan_records(tmp_path, plot):
    with pytest.raises(ValueError, match="empty"):
        plot(rec.empty_records(), tmp_path / "empty.png")
    table = synthetic_records(20)
    table.loc[3, "kl_delete"] = np.nan
    with pytest.raises(ValueError, match="kl_delete has 1 NaN"):
        plot(table, tmp_path / "nan.png")
    assert list(tmp_path.iterdir()) == []


def test_gaussian_kde_integrates_to_one_and_matches_a_single_kernel():
    grid = np.linspace(-10.0, 10.0, 4001)
    density = plots.gaussian_kde(np.random.default_rng(0).normal(size=300), grid)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
    single = plots.gaussian_kde(np.array([1.0]), np.array([1.0, 2.0]), bandwidth=0.5)
    expected = [1 / (0.5 * math.sqrt(2 * math.pi)), math.exp(-2.0) / (0.5 * math.sqrt(2 * math.pi))]
    assert single.tolist() == pytest.approx(expected)
