"""The register / bundle partition joined with substitution records (paper-method §3.5-3.6, App. F.2, H).

Each record's substituted atom (the ``atom`` column) takes that atom's class and median cosine from the partition's
atom table (``partition.partition_atoms(...).atoms``). Then:

- ``class_win_rates``: per class, the firing-level win rate (KL_atom < KL_delete, Wilson interval) and the mean of
  the per-atom win rates (atoms with at least ``min_firings`` firings), and a two-sided Mann-Whitney U test (scipy)
  between the per-atom win rates of registers and bundles;
- ``cosine_bin_table``: atoms, firings and the firing-level win rate per bin of the atom's median cosine (paper
  Table 13: ``< 0``, ``[0, .05)``, ``[.05, .2)``, ``[.2, .3)``, ``>= .3``);
- ``failure_by_quartile``: the failure rate (KL_atom >= KL_delete) per quartile of KL_delete, the effect size
  (paper Fig. 14).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .records import validate_records
from .stats import proportion, win_indicator

COSINE_BINS = (-np.inf, 0.0, 0.05, 0.2, 0.3, np.inf)


def join_classes(records: pd.DataFrame, atoms: pd.DataFrame) -> pd.DataFrame:
    """The records with the substituted atom's ``class`` and ``median_cos`` and a boolean ``win`` column."""
    table = validate_records(records)
    lookup = atoms.set_index("atom")[["class", "median_cos"]]
    unknown = sorted(set(table["atom"]) - set(lookup.index))
    if unknown:
        raise ValueError(f"records substitute atoms {unknown[:10]} that the partition's atom table does not have "
                         f"(atoms 0..{len(lookup) - 1}): the records and the partition come from different SAEs")
    joined = table.join(lookup, on="atom")
    joined["win"] = win_indicator(joined["kl_atom"].to_numpy(), joined["kl_delete"].to_numpy())
    return joined


def per_atom_win_rates(joined: pd.DataFrame, min_firings: int = 5) -> pd.DataFrame:
    """One row per substituted atom with at least ``min_firings`` firings: class, median cosine, firings, win rate."""
    grouped = joined.groupby("atom")
    table = pd.DataFrame({"class": grouped["class"].first(), "median_cos": grouped["median_cos"].first(),
                          "firings": grouped.size(), "win_rate": grouped["win"].mean()})
    return table[table["firings"] >= min_firings].reset_index()


def class_win_rates(records: pd.DataFrame, atoms: pd.DataFrame, *, min_firings: int = 5) -> tuple[pd.DataFrame, dict]:
    """Per class (register, bundle): firings, firing-level win rate with its Wilson interval, atoms with at least
    ``min_firings`` firings and the mean / median of their win rates; and the two-sided Mann-Whitney U test between
    the per-atom win rates of registers and bundles (``{"u", "p", "n_register", "n_bundle"}``, NaN when a class has
    no atom)."""
    from scipy.stats import mannwhitneyu

    joined = join_classes(records, atoms)
    per_atom = per_atom_win_rates(joined, min_firings)
    rows = []
    for name in ("register", "bundle"):
        firings = joined.loc[joined["class"] == name, "win"].to_numpy()
        rates = per_atom.loc[per_atom["class"] == name, "win_rate"]
        win = proportion(firings) if firings.size else None
        rows.append({
            "class": name, "firings": int(firings.size),
            "win_rate": win.rate if win else np.nan, "wilson_low": win.low if win else np.nan,
            "wilson_high": win.high if win else np.nan, "atoms": int(rates.size),
            "mean_atom_win_rate": float(rates.mean()) if rates.size else np.nan,
            "median_atom_win_rate": float(rates.median()) if rates.size else np.nan,
        })
    register = per_atom.loc[per_atom["class"] == "register", "win_rate"].to_numpy()
    bundle = per_atom.loc[per_atom["class"] == "bundle", "win_rate"].to_numpy()
    test = {"u": np.nan, "p": np.nan, "n_register": int(register.size), "n_bundle": int(bundle.size)}
    if register.size and bundle.size:
        result = mannwhitneyu(register, bundle, alternative="two-sided")
        test.update(u=float(result.statistic), p=float(result.pvalue))
    return pd.DataFrame(rows), test


def cosine_bin_table(records: pd.DataFrame, atoms: pd.DataFrame, *, bins=COSINE_BINS,
                     min_firings: int = 5) -> pd.DataFrame:
    """Per bin of the atom's median cosine: atoms (with at least ``min_firings`` firings), their firings and the
    firing-level win rate (paper Table 13)."""
    per_atom = per_atom_win_rates(join_classes(records, atoms), min_firings)
    labels = [_bin_label(lo, hi) for lo, hi in zip(bins[:-1], bins[1:])]
    per_atom["bin"] = pd.cut(per_atom["median_cos"], bins=list(bins), labels=labels, right=False)
    per_atom["wins"] = per_atom["win_rate"] * per_atom["firings"]
    grouped = per_atom.groupby("bin", observed=False)
    table = pd.DataFrame({"atoms": grouped.size(), "firings": grouped["firings"].sum(), "wins": grouped["wins"].sum()})
    table["win_rate"] = table["wins"] / table["firings"].replace(0, np.nan)
    return table.drop(columns="wins").reset_index()


def _bin_label(lo: float, hi: float) -> str:
    if np.isinf(lo):
        return f"< {hi:g}"
    if np.isinf(hi):
        return f">= {lo:g}"
    return f"[{lo:g}, {hi:g})"


def failure_by_quartile(records: pd.DataFrame) -> pd.DataFrame:
    """Failure rate (KL_atom >= KL_delete) per quartile of KL_delete (Q1 = smallest effects): firings, the quartile's
    KL_delete range and the failure rate (paper Fig. 14)."""
    table = validate_records(records)
    if len(table) < 4:
        raise ValueError(f"quartiles need at least 4 firings, got {len(table)}")
    quartile = pd.qcut(table["kl_delete"].rank(method="first"), 4, labels=["Q1", "Q2", "Q3", "Q4"])
    failed = ~win_indicator(table["kl_atom"].to_numpy(), table["kl_delete"].to_numpy())
    frame = pd.DataFrame({"quartile": quartile, "failed": failed, "kl_delete": table["kl_delete"]})
    grouped = frame.groupby("quartile", observed=False)
    return pd.DataFrame({"firings": grouped.size(), "kl_delete_min": grouped["kl_delete"].min(),
                         "kl_delete_max": grouped["kl_delete"].max(),
                         "failure_rate": grouped["failed"].mean()}).reset_index()
