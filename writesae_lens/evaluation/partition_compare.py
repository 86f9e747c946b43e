"""Comparing partitions: across architectures or cells (KS tests) and across seeds (paper-method §5.1).

**Firing-level cosine distributions.** Two partitions (two architectures, two cells, two seeds) each give a cosine per
firing (``firings.csv`` of ``writesae partition``). Their distributions are compared with the two-sample
Kolmogorov-Smirnov statistic ``D = sup_x |F_a(x) - F_b(x)|`` (scipy's ``ks_2samp``). The firings of one atom are not
independent, so besides scipy's p-value (which assumes they are) each contrast gets a **feature-level cluster
bootstrap** p-value: under the null that both groups draw from one population of atoms, the atoms of both groups are
pooled, and each resample draws as many atoms as each group has, with replacement, from the pool, taking all
firings of every drawn atom; ``p = (1 + #{D* >= D}) / (1 + B)``. The p-values of all contrasts are then corrected
for multiple testing with Holm's step-down method (statsmodels' ``multipletests``).

**Across seeds.** SAEs trained on the same cell with different seeds: their class counts (mean, standard deviation,
coefficient of variation) and how many atoms find a match in the other seed's dictionary. Atoms are compared by the
Frobenius cosine of the matrices ``A_i = sum_r p_r q_r^T``, computed from the factors:
``<A_i, B_j>_F = sum_{r,s} (p_r . p'_s)(q_r . q'_s)``. An atom "matches" when its best cosine in the other dictionary
is above a threshold (0.9 in the paper), and the one-to-one assignment maximising the total cosine (scipy's
``linear_sum_assignment``) gives a second, stricter count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .partition import CLASSES

MATCH_THRESHOLD = 0.9


# --- KS tests with a feature-level cluster bootstrap --------------------------------------------------------------


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample KS statistic ``sup_x |F_a(x) - F_b(x)|`` (the readable definition: both empirical CDFs
    evaluated at every observed value)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(cdf_a - cdf_b).max())


def cluster_bootstrap_ks(values_a, clusters_a, values_b, clusters_b, *, n_resamples: int = 2000,
                         seed: int | np.random.Generator = 0) -> dict:
    """KS test of two samples whose observations come in clusters (firings of one atom).

    Returns the statistic ``d``, scipy's ``p_ks`` (independent observations) and ``p_cluster``: the share of
    resamples, drawn under the pooled null by whole clusters, with a statistic at least ``d`` (with the +1
    correction, so never 0). Also the numbers of observations and clusters of each group."""
    from scipy import stats

    values_a, values_b = np.asarray(values_a, np.float64), np.asarray(values_b, np.float64)
    clusters_a, clusters_b = np.asarray(clusters_a), np.asarray(clusters_b)
    for name, values, clusters in (("a", values_a, clusters_a), ("b", values_b, clusters_b)):
        if values.ndim != 1 or values.shape != clusters.shape:
            raise ValueError(f"group {name}: values and clusters must be 1-D of one length, got {values.shape} and "
                             f"{clusters.shape}")
        if values.size == 0:
            raise ValueError(f"group {name} has no observations")
        if not np.isfinite(values).all():
            raise ValueError(f"group {name} has non-finite values")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    d = ks_statistic(values_a, values_b)
    p_ks = float(stats.ks_2samp(values_a, values_b).pvalue)
    groups_a, groups_b = _clusters(values_a, clusters_a), _clusters(values_b, clusters_b)
    pool = groups_a + groups_b
    exceed = 0
    for _ in range(n_resamples):
        draw_a = rng.integers(0, len(pool), len(groups_a))
        draw_b = rng.integers(0, len(pool), len(groups_b))
        star = ks_statistic(np.concatenate([pool[i] for i in draw_a]), np.concatenate([pool[i] for i in draw_b]))
        exceed += star >= d - 1e-12
    return {"d": d, "p_ks": p_ks, "p_cluster": (1 + exceed) / (1 + n_resamples),
            "n_a": int(values_a.size), "n_b": int(values_b.size),
            "clusters_a": len(groups_a), "clusters_b": len(groups_b)}


def _clusters(values: np.ndarray, clusters: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(clusters, kind="stable")
    _, starts = np.unique(clusters[order], return_index=True)
    return np.split(values[order], starts[1:])


def holm(p_values, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction (statsmodels): the adjusted p-values and which hypotheses are rejected."""
    from statsmodels.stats.multitest import multipletests

    reject, adjusted, _, _ = multipletests(np.asarray(p_values, np.float64), alpha=alpha, method="holm")
    return adjusted, reject


def compare_firing_cosines(firings: Mapping[str, pd.DataFrame], *, column: str = "cos_beta",
                           contrasts: Sequence[tuple[str, str]] | None = None, n_resamples: int = 2000,
                           alpha: float = 0.05, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Pairwise KS tests of the firing-level cosines of several partitions (``{label: firings table}``, each with
    an ``atom`` column and ``column``), every pair unless ``contrasts`` names them; one row per contrast with the
    statistic, scipy's p, the cluster-bootstrap p, its Holm-adjusted value over all contrasts and the decision at
    ``alpha``. The medians of each group are there to say which way the difference goes."""
    labels = list(firings)
    if len(labels) < 2:
        raise ValueError(f"comparing partitions needs at least two groups, got {labels}")
    for label, table in firings.items():
        missing = {"atom", column} - set(table.columns)
        if missing:
            raise ValueError(f"group {label!r}: the firings table lacks {sorted(missing)}; columns are "
                             f"{list(table.columns)}")
    contrasts = list(combinations(labels, 2)) if contrasts is None else [tuple(pair) for pair in contrasts]
    for pair in contrasts:
        unknown = [label for label in pair if label not in firings]
        if len(pair) != 2 or unknown or pair[0] == pair[1]:
            raise ValueError(f"contrast {pair!r} must name two different groups of {labels}")
    rng = np.random.default_rng(seed)
    rows = []
    for a, b in tqdm(contrasts, desc="KS contrasts", disable=not progress):
        fa, fb = firings[a], firings[b]
        test = cluster_bootstrap_ks(fa[column], fa["atom"], fb[column], fb["atom"], n_resamples=n_resamples,
                                    seed=rng)
        rows.append({"group_a": a, "group_b": b, **test, "median_a": float(np.median(fa[column])),
                     "median_b": float(np.median(fb[column]))})
    table = pd.DataFrame(rows)
    table["p_holm"], table["reject"] = holm(table["p_cluster"], alpha)
    return table


# --- across seeds -----------------------------------------------------------------------------------------------


def class_count_stability(atoms: Mapping[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The class counts of each run (``{label: atoms table with a class column}``) and, per class, their mean,
    sample standard deviation and coefficient of variation (std / mean) across runs."""
    counts = pd.DataFrame([{"run": label, **{name: int((table["class"] == name).sum()) for name in CLASSES}}
                           for label, table in atoms.items()])
    rows = []
    for name in CLASSES:
        values = counts[name].to_numpy(np.float64)
        std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
        mean = float(values.mean())
        rows.append({"class": name, "mean": mean, "std": std, "cv": std / mean if mean else float("nan")})
    return counts, pd.DataFrame(rows)


def atom_cosines(key_a: Float[Tensor, "n rank d_k"], value_a: Float[Tensor, "n rank d_v"],
                 key_b: Float[Tensor, "m rank2 d_k"], value_b: Float[Tensor, "m rank2 d_v"],
                 eps: float = 1e-30) -> Float[Tensor, "n m"]:
    """Frobenius cosine between every atom of dictionary a and every atom of dictionary b, from the factors:
    ``sum_{r,s} (p_r . p'_s)(q_r . q'_s) / (||A|| ||B||)``. In fp64."""
    pa, qa, pb, qb = (x.double() for x in (key_a, value_a, key_b, value_b))
    inner = torch.einsum("nrk,msk,nrv,msv->nm", pa, pb, qa, qb)
    return inner / (_frobenius_norms(pa, qa)[:, None] * _frobenius_norms(pb, qb)[None, :]).clamp_min(eps)


def _frobenius_norms(p: Tensor, q: Tensor) -> Tensor:
    gram = torch.einsum("nrk,nsk->nrs", p, p) * torch.einsum("nrv,nsv->nrs", q, q)  # <p_r q_r^T, p_s q_s^T>
    return gram.sum((-1, -2)).clamp_min(0).sqrt()


def best_matches(sae_a, sae_b, *, atoms_a=None, atoms_b=None, chunk: int = 1024) -> pd.DataFrame:
    """For every atom of ``sae_a`` (or those in ``atoms_a``): its best match among the atoms of ``sae_b`` (or
    ``atoms_b``) by absolute Frobenius cosine (a rank-1 atom's sign is shared between its factors and its code, so
    ``-A`` is the same atom read backwards), and the cosine of the one-to-one assignment that maximises the total
    absolute cosine (scipy's ``linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    pa, qa = _factors(sae_a, atoms_a)
    pb, qb = _factors(sae_b, atoms_b)
    if pa.shape[-1] != pb.shape[-1] or qa.shape[-1] != qb.shape[-1]:
        raise ValueError(f"the two SAEs have atoms of different shapes: {pa.shape[-1]}x{qa.shape[-1]} and "
                         f"{pb.shape[-1]}x{qb.shape[-1]}")
    cosines = torch.cat([atom_cosines(pa[i : i + chunk], qa[i : i + chunk], pb, qb).abs()
                         for i in range(0, len(pa), chunk)]).numpy()  # [n, m]
    rows, cols = linear_sum_assignment(cosines, maximize=True)
    assigned = np.full(len(pa), np.nan)
    assigned[rows] = cosines[rows, cols]
    index_a = np.arange(sae_a.cfg.d_sae) if atoms_a is None else np.asarray(atoms_a)
    index_b = np.arange(sae_b.cfg.d_sae) if atoms_b is None else np.asarray(atoms_b)
    best = cosines.argmax(axis=1)
    partner = np.full(len(pa), -1)
    partner[rows] = index_b[cols]
    return pd.DataFrame({"atom": index_a, "best_match": index_b[best], "best_cos": cosines.max(axis=1),
                         "assigned_match": partner, "assigned_cos": assigned})


def _factors(sae, atoms) -> tuple[Tensor, Tensor]:
    key, value = sae.W_dec_key.detach().cpu(), sae.W_dec_value.detach().cpu()  # [d_sae, rank, d_k], [.., d_v]
    if atoms is not None:
        index = torch.as_tensor(np.asarray(atoms), dtype=torch.long)
        key, value = key[index], value[index]
    if len(key) == 0:
        raise ValueError("no atoms to match")
    return key, value


def seed_matches(saes: Mapping[str, object], *, threshold: float = MATCH_THRESHOLD,
                 alive: Mapping[str, np.ndarray] | None = None, progress: bool = True) -> pd.DataFrame:
    """Every ordered pair of seeds: the share of the first one's atoms (its alive atoms where ``alive`` gives a
    boolean mask per label) whose best match in the second dictionary has ``|cos| > threshold``, the same for the
    one-to-one assignment, and the median best cosine."""
    labels = list(saes)
    if len(labels) < 2:
        raise ValueError(f"matching atoms across seeds needs at least two SAEs, got {labels}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    rows = []
    pairs = [(a, b) for a in labels for b in labels if a != b]
    for a, b in tqdm(pairs, desc="matching atoms", disable=not progress):
        atoms_a = None if alive is None else np.flatnonzero(alive[a])
        atoms_b = None if alive is None else np.flatnonzero(alive[b])
        table = best_matches(saes[a], saes[b], atoms_a=atoms_a, atoms_b=atoms_b)
        rows.append({"run": a, "other": b, "atoms": len(table), "threshold": threshold,
                     "matched": float((table["best_cos"] > threshold).mean()),
                     "matched_one_to_one": float((table["assigned_cos"] > threshold).mean()),
                     "median_best_cos": float(table["best_cos"].median())})
    return pd.DataFrame(rows)
