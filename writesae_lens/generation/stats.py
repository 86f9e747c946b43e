"""Statistics of the steering protocols that ``evaluation/stats.py`` does not have (paired binary outcomes, paired
differences, bootstrap intervals of any statistic, multiple-comparison correction). Each is checked against scipy on
known data in the tests; the Wilson interval is ``evaluation.stats.wilson_interval``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from jaxtyping import Bool, Float
from scipy import stats as sps


@dataclass(frozen=True)
class PairedBinary:
    """McNemar's exact test of two paired binary outcomes: the discordant counts and the two-sided binomial p."""

    only_first: int  # first True, second False
    only_second: int
    p_value: float


def mcnemar_exact(first: Bool[np.ndarray, " n"], second: Bool[np.ndarray, " n"]) -> PairedBinary:
    """Exact McNemar test: under H0 the discordant pairs split 50/50 (``p = binomtest(b, b + c, 1/2)``; 1 when no
    pair is discordant)."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"paired outcomes must be two 1-D arrays of one length; got {first.shape} and {second.shape}")
    b, c = int((first & ~second).sum()), int((~first & second).sum())
    p = 1.0 if b + c == 0 else float(sps.binomtest(b, b + c, 0.5).pvalue)
    return PairedBinary(b, c, p)


def bootstrap_interval(values: Float[np.ndarray, " n"], statistic: Callable = np.median, *, n_resamples: int = 10_000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (resampling ``values`` with replacement)."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, values.size, size=(n_resamples, values.size))
    stats = statistic(values[draws], axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


@dataclass(frozen=True)
class PairedDifference:
    """A paired comparison ``treated - baseline``: mean difference, paired t-test, Cohen's d_z and a bootstrap CI of
    the mean difference."""

    n: int
    mean_diff: float
    t: float
    p_value: float
    cohens_dz: float
    ci_low: float
    ci_high: float


def cohens_dz(diff: Float[np.ndarray, " n"]) -> float:
    """Paired effect size ``mean(diff) / sd(diff)`` (sample sd, ddof = 1); NaN when the sd is 0."""
    diff = np.asarray(diff, dtype=float)
    sd = diff.std(ddof=1) if diff.size > 1 else 0.0
    return float(diff.mean() / sd) if sd > 0 else float("nan")


def paired_difference(treated, baseline, *, n_resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    treated, baseline = np.asarray(treated, dtype=float), np.asarray(baseline, dtype=float)
    if treated.shape != baseline.shape or treated.ndim != 1 or treated.size < 2:
        raise ValueError(f"paired values must be two 1-D arrays of one length >= 2; got {treated.shape}, "
                         f"{baseline.shape}")
    diff = treated - baseline
    if np.all(diff == diff[0]):
        t, p = float("nan"), float("nan")  # no spread: the t-test is undefined
    else:
        result = sps.ttest_rel(treated, baseline)
        t, p = float(result.statistic), float(result.pvalue)
    low, high = bootstrap_interval(diff, np.mean, n_resamples=n_resamples, seed=seed)
    return PairedDifference(int(diff.size), float(diff.mean()), t, p, cohens_dz(diff), low, high)


def bonferroni(p_values, n_tests: int | None = None) -> np.ndarray:
    """``min(1, p * n_tests)`` (``n_tests`` defaults to the number of p-values)."""
    p = np.asarray(p_values, dtype=float)
    return np.minimum(1.0, p * (p.size if n_tests is None else n_tests))


def signed_rank_p(values: Float[np.ndarray, " n"]) -> float:
    """Two-sided Wilcoxon signed-rank p of ``values`` against 0 (scipy; 1 when every value is 0)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0 or np.all(values == 0):
        return 1.0
    return float(sps.wilcoxon(values).pvalue)
