"""Statistics of the substitution test (paper-method §3.5-3.6). Pure functions: numpy arrays in, small results out.

Every firing has three KLs to the native output distribution, one per edited condition (records.py):
KL_atom, KL_delete, KL_random. The claim under test is that substituting the atom beats deleting the write,
KL_atom < KL_delete. The functions below measure how often (win rate, strict chain), with which uncertainty
(Wilson, cluster bootstrap), how strongly (paired Cliff's δ), how significantly (Wilcoxon signed-rank, sign-flip
permutation), at what scale (medians per layer) and whether it holds atom by atom (population test).

`summarize(records)` runs all of them on a record table; `format_summary` prints the result.

Inputs are 1-D numpy arrays with one entry per firing. They must be non-empty, equally long and finite;
anything else raises `ValueError` with the reason. Random procedures take a `seed` (an int or a
`numpy.random.Generator`) and are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float, Int, Shaped

from writesae_lens.evaluation.numerical_floor import FloorSummary, floor_summary
from writesae_lens.evaluation.records import CONDITIONS, kl_column, validate_records

Z_95 = 1.96
"""The normal quantile the paper uses for 95% intervals."""

_MAX_CHUNK_ELEMENTS = 4_000_000  # resampling works in chunks of at most this many drawn indices / signs


# --- input checks -----------------------------------------------------------------------------------------------


def _finite_vector(name: str, values: np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (one value per firing), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: there are no firings to evaluate")
    not_finite = ~np.isfinite(array)
    if not_finite.any():
        first = int(np.flatnonzero(not_finite)[0])
        raise ValueError(
            f"{name} has {int(not_finite.sum())} NaN or infinite values (first at index {first}); "
            "drop or recompute those firings before computing statistics"
        )
    return array


def _finite_vectors(**named: np.ndarray) -> list[np.ndarray]:
    arrays = [_finite_vector(name, values) for name, values in named.items()]
    lengths = {name: array.size for name, array in zip(named, arrays)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-firing arrays differ in length: {lengths}")
    return arrays


def _generator(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def _chunk_rows(n_rows: int, row_length: int) -> int:
    return max(1, min(n_rows, _MAX_CHUNK_ELEMENTS // max(row_length, 1)))


# --- proportions: win rate and strict chain ---------------------------------------------------------------------


@dataclass(frozen=True)
class Proportion:
    """A binomial proportion successes/n with its Wilson interval [low, high]."""

    successes: int
    n: int
    rate: float
    low: float
    high: float


def wilson_interval(successes: int, n: int, *, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion p = successes / n.

        centre     = (p + z²/(2n)) / (1 + z²/n)
        half-width = z · sqrt(p(1 - p)/n + z²/(4n²)) / (1 + z²/n)

    Returns (centre - half-width, centre + half-width), which is exactly 0 (1) at the lower (upper) end when
    successes = 0 (= n). Wilson(4481, 4851) = [0.9159, 0.9309].
    """
    if n <= 0:
        raise ValueError(f"the Wilson interval needs n > 0 trials, got n = {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n] = [0, {n}], got {successes}")
    p = successes / n
    shrink = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / shrink
    low = 0.0 if successes == 0 else centre - half_width  # the formula gives 0 (1) up to round-off
    high = 1.0 if successes == n else centre + half_width
    return low, high


def proportion(outcomes: Bool[np.ndarray, " firing"], *, z: float = Z_95) -> Proportion:
    """The fraction of True entries of `outcomes`, with its Wilson interval."""
    outcomes = np.asarray(outcomes, dtype=bool)
    if outcomes.ndim != 1 or outcomes.size == 0:
        raise ValueError(f"outcomes must be a non-empty 1-D array, got shape {outcomes.shape}")
    successes, n = int(outcomes.sum()), int(outcomes.size)
    low, high = wilson_interval(successes, n, z=z)
    return Proportion(successes=successes, n=n, rate=successes / n, low=low, high=high)


def win_indicator(
    kl_atom: Float[np.ndarray, " firing"], kl_delete: Float[np.ndarray, " firing"]
) -> Bool[np.ndarray, " firing"]:
    """1[KL_atom < KL_delete] per firing: the atom beats deletion. Ties are losses."""
    kl_atom, kl_delete = _finite_vectors(kl_atom=kl_atom, kl_delete=kl_delete)
    return kl_atom < kl_delete


def strict_chain_indicator(
    kl_atom: Float[np.ndarray, " firing"],
    kl_delete: Float[np.ndarray, " firing"],
    kl_random: Float[np.ndarray, " firing"],
) -> Bool[np.ndarray, " firing"]:
    """1[KL_atom < KL_delete < KL_random] per firing. Ties break the chain."""
    kl_atom, kl_delete, kl_random = _finite_vectors(kl_atom=kl_atom, kl_delete=kl_delete, kl_random=kl_random)
    return (kl_atom < kl_delete) & (kl_delete < kl_random)


def win_rate(
    kl_atom: Float[np.ndarray, " firing"], kl_delete: Float[np.ndarray, " firing"], *, z: float = Z_95
) -> Proportion:
    """Win rate = mean over firings of 1[KL_atom < KL_delete], with its Wilson interval."""
    return proportion(win_indicator(kl_atom, kl_delete), z=z)


def strict_chain_rate(
    kl_atom: Float[np.ndarray, " firing"],
    kl_delete: Float[np.ndarray, " firing"],
    kl_random: Float[np.ndarray, " firing"],
    *,
    z: float = Z_95,
) -> Proportion:
    """Strict chain rate = mean over firings of 1[KL_atom < KL_delete < KL_random], with its Wilson interval."""
    return proportion(strict_chain_indicator(kl_atom, kl_delete, kl_random), z=z)


# --- cluster bootstrap ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapInterval:
    """A point estimate with a percentile bootstrap interval [low, high] from `n_resamples` resamples of `n_units`."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_units: int
    n_resamples: int


def cluster_ids(clusters: Shaped[np.ndarray, "firing *key"]) -> Int[np.ndarray, " firing"]:
    """Dense ids 0..C-1 of each firing's cluster. A 2-D input is a composite key, one row per firing.

    Use a composite key when ids repeat across groups, e.g. (layer, head, feature): feature 412 at L1 and at L9
    are different features.
    """
    clusters = np.asarray(clusters)
    if clusters.ndim not in (1, 2) or clusters.shape[0] == 0:
        raise ValueError(f"clusters must be a non-empty 1-D array or a 2-D key array, got shape {clusters.shape}")
    _, inverse = np.unique(clusters, axis=0 if clusters.ndim == 2 else None, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def cluster_bootstrap_rate(
    outcomes: Bool[np.ndarray, " firing"],
    clusters: Shaped[np.ndarray, "firing *key"],
    *,
    n_resamples: int = 5000,
    confidence: float = 0.95,
    seed: int | np.random.Generator = 0,
) -> BootstrapInterval:
    """Cluster bootstrap of a pooled rate (e.g. the win rate) with a percentile interval.

    With clusters c = 1..C holding s_c successes in n_c firings, each resample draws C clusters with replacement,
    c*_1..c*_C, and pools their firings:

        rate* = Σ_j s_{c*_j} / Σ_j n_{c*_j}

    The interval is the (α/2, 1 - α/2) quantiles of rate* over resamples, α = 1 - confidence. The estimate is
    the plain pooled rate Σ s_c / Σ n_c. Cluster by feature (composite key, see `cluster_ids`) or by passage.
    """
    outcomes = np.asarray(outcomes, dtype=bool)
    if outcomes.ndim != 1 or outcomes.size == 0:
        raise ValueError(f"outcomes must be a non-empty 1-D array, got shape {outcomes.shape}")
    ids = cluster_ids(clusters)
    if ids.size != outcomes.size:
        raise ValueError(f"outcomes has {outcomes.size} firings but clusters has {ids.size}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    _check_confidence(confidence)

    successes_per_cluster = np.bincount(ids, weights=outcomes.astype(np.float64))
    firings_per_cluster = np.bincount(ids).astype(np.float64)
    n_clusters = firings_per_cluster.size
    rng = _generator(seed)
    resampled = np.empty(n_resamples)
    chunk = _chunk_rows(n_resamples, n_clusters)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        drawn = rng.integers(0, n_clusters, size=(stop - start, n_clusters))
        resampled[start:stop] = successes_per_cluster[drawn].sum(axis=1) / firings_per_cluster[drawn].sum(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(resampled, [alpha / 2, 1 - alpha / 2])
    return BootstrapInterval(
        estimate=float(outcomes.mean()),
        low=float(low),
        high=float(high),
        confidence=confidence,
        n_units=int(n_clusters),
        n_resamples=int(n_resamples),
    )


def cluster_bootstrap_win_rate(
    kl_atom: Float[np.ndarray, " firing"],
    kl_delete: Float[np.ndarray, " firing"],
    clusters: Shaped[np.ndarray, "firing *key"],
    *,
    n_resamples: int = 5000,
    confidence: float = 0.95,
    seed: int | np.random.Generator = 0,
) -> BootstrapInterval:
    """`cluster_bootstrap_rate` of the win indicator 1[KL_atom < KL_delete]."""
    return cluster_bootstrap_rate(
        win_indicator(kl_atom, kl_delete), clusters, n_resamples=n_resamples, confidence=confidence, seed=seed
    )


# --- effect size and paired tests -------------------------------------------------------------------------------


def paired_cliffs_delta(kl_atom: Float[np.ndarray, " firing"], kl_delete: Float[np.ndarray, " firing"]) -> float:
    """Paired Cliff's δ (dominance form) of deletion over the atom:

        δ = P(KL_delete > KL_atom) - P(KL_delete < KL_atom) = mean over firings of sign(KL_delete - KL_atom)

    Without ties δ = 2 · win - 1 (win 0.912 -> 0.824). This is not the unpaired all-pairs Cliff's δ.
    """
    kl_atom, kl_delete = _finite_vectors(kl_atom=kl_atom, kl_delete=kl_delete)
    return float(np.mean(np.sign(kl_delete - kl_atom)))


def average_ranks(values: Float[np.ndarray, " n"]) -> tuple[Float[np.ndarray, " n"], Int[np.ndarray, " group"]]:
    """Ranks 1..n of `values` with tied values sharing the mean of their ranks; also the size of each tie group."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    _, first_index, group_sizes = np.unique(values[order], return_index=True, return_counts=True)
    group_mean_rank = first_index + (group_sizes + 1) / 2.0
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(group_mean_rank, group_sizes)
    return ranks, group_sizes.astype(np.int64)


def log_erfc(x: float) -> float:
    """ln erfc(x), finite far beyond where erfc(x) underflows (x ≳ 26.5).

    For x < 3, ln(math.erfc(x)). For x ≥ 3, erfc(x) = exp(-x²) · erfcx(x) with the continued fraction

        erfcx(x) = 1 / (√π · (x + (1/2) / (x + 1 / (x + (3/2) / (x + 2 / (x + ...))))))

    evaluated from 60 levels down (relative error ~1e-16 for x ≥ 3), so ln erfc(x) = -x² - ln(√π · t).
    """
    if x < 3.0:
        return math.log(math.erfc(x))
    t = x
    for level in range(60, 0, -1):
        t = x + (level / 2.0) / t
    return -x * x - math.log(math.sqrt(math.pi) * t)


def two_sided_normal_log10_p(z: float) -> float:
    """log10 of the two-sided normal p-value, p = 2 Φ(-|z|) = erfc(|z| / √2), without underflow."""
    return log_erfc(abs(z) / math.sqrt(2.0)) / math.log(10.0)


@dataclass(frozen=True)
class WilcoxonResult:
    """Wilcoxon signed-rank test of differences d (here KL_delete - KL_atom), two-sided.

    `w_plus` / `w_minus` are the rank sums of positive / negative differences; `statistic` = min(W+, W-) (the
    scipy convention). `z` is the signed normal score of W+, positive when deletion moves the output more (scipy
    reports -|z|); NaN for the exact method. `p_value` may underflow to 0 for huge effects; `log10_p` stays
    finite. `n_used` counts the differences that were ranked (zeros dropped with zero_method "wilcox", kept with
    "pratt"), `n_zero` the zero differences.
    """

    n_used: int
    n_zero: int
    w_plus: float
    w_minus: float
    statistic: float
    z: float
    p_value: float
    log10_p: float
    method: str
    zero_method: str


def wilcoxon_signed_rank(
    differences: Float[np.ndarray, " firing"],
    *,
    zero_method: str = "wilcox",
    method: str = "auto",
    continuity: bool = False,
) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test that the differences are symmetric about 0.

    Rank |d_i| (average ranks for ties); W+ = Σ_{d_i > 0} rank_i, W- = Σ_{d_i < 0} rank_i.

    Zeros (`zero_method`):
        "wilcox": drop zero differences, then rank the remaining n.
        "pratt":  rank all n differences including the n0 zeros (which take the lowest ranks), then leave the
                  zeros out of W+ and W-; the null moments below subtract the zeros' share (Cureton 1967).

    Normal approximation (`method="normal"`), with t_g the sizes of tie groups among the non-zero |d|:

        E[W+]   = n(n+1)/4 - n0(n0+1)/4
        Var[W+] = [n(n+1)(2n+1) - n0(n0+1)(2n0+1) - ½ Σ_g (t_g³ - t_g)] / 24
        z       = (W+ - E[W+] ∓ ½·continuity) / sqrt(Var[W+]),    p = erfc(|z| / √2)

    (n0 = 0 for "wilcox".) log10 p uses `log_erfc`, so p < 1e-300 still gets a meaningful log10_p.

    Exact (`method="exact"`): the null distribution of W+ over all 2^n sign patterns, counted by dynamic
    programming; p = min(1, 2 · min(P(W+ ≤ w), P(W+ ≥ w))). Valid only without ties or zeros (zeros dropped by
    "wilcox" are fine), n ≤ 200. `method="auto"` is exact when that holds and n ≤ 50, else normal.

    With no non-zero difference there is no evidence either way: W± = 0, z = 0, p = 1, method "degenerate".
    """
    d = _finite_vector("differences", differences)
    if zero_method not in ("wilcox", "pratt"):
        raise ValueError(f"zero_method must be 'wilcox' or 'pratt', got {zero_method!r}")
    if method not in ("auto", "normal", "exact"):
        raise ValueError(f"method must be 'auto', 'normal' or 'exact', got {method!r}")

    is_zero = d == 0
    n_zero = int(is_zero.sum())
    if n_zero == d.size:
        return WilcoxonResult(d.size if zero_method == "pratt" else 0, n_zero, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0,
                              "degenerate", zero_method)  # fmt: skip
    ranked = d if zero_method == "pratt" else d[~is_zero]
    ranks, _ = average_ranks(np.abs(ranked))
    w_plus = float(ranks[ranked > 0].sum())
    w_minus = float(ranks[ranked < 0].sum())
    _, nonzero_tie_sizes = np.unique(np.abs(d[~is_zero]), return_counts=True)
    has_ties = bool((nonzero_tie_sizes > 1).any())
    zeros_in_ranking = n_zero if zero_method == "pratt" else 0

    exact_allowed = not has_ties and zeros_in_ranking == 0
    if method == "exact" and not exact_allowed:
        raise ValueError("the exact Wilcoxon distribution needs differences without ties (and no zeros under 'pratt')")
    use_exact = method == "exact" or (method == "auto" and exact_allowed and ranked.size <= 50)

    common = dict(n_used=int(ranked.size), n_zero=n_zero, w_plus=w_plus, w_minus=w_minus,
                  statistic=min(w_plus, w_minus), zero_method=zero_method)  # fmt: skip
    if use_exact:
        p_value = _exact_signed_rank_p(w_plus, int(ranked.size))
        return WilcoxonResult(**common, z=math.nan, p_value=p_value, log10_p=math.log10(p_value), method="exact")

    n, n0 = float(ranked.size), float(zeros_in_ranking)
    mean = (n * (n + 1) - n0 * (n0 + 1)) / 4.0
    tie_term = 0.5 * float(np.sum(nonzero_tie_sizes.astype(np.float64) ** 3 - nonzero_tie_sizes))
    variance = (n * (n + 1) * (2 * n + 1) - n0 * (n0 + 1) * (2 * n0 + 1) - tie_term) / 24.0
    shift = w_plus - mean
    if continuity:
        shift -= math.copysign(0.5, shift) if shift != 0 else 0.0
    z = shift / math.sqrt(variance)
    log10_p = two_sided_normal_log10_p(z)
    return WilcoxonResult(**common, z=z, p_value=10.0**log10_p, log10_p=log10_p, method="normal")


def _exact_signed_rank_p(w_plus: float, n: int) -> float:
    """Two-sided exact p of W+ = w_plus for n untied non-zero differences (ranks 1..n)."""
    if n > 200:
        raise ValueError(f"the exact Wilcoxon distribution is limited to n <= 200, got n = {n}")
    max_sum = n * (n + 1) // 2
    ways = np.zeros(max_sum + 1)  # ways[s] = number of subsets of {1..n} with rank sum s
    ways[0] = 1.0
    for rank in range(1, n + 1):
        ways[rank:] = ways[rank:] + ways[:-rank]
    probability = ways / 2.0**n
    w = int(round(w_plus))
    lower_tail = float(probability[: w + 1].sum())
    upper_tail = float(probability[w:].sum())
    return min(1.0, 2.0 * min(lower_tail, upper_tail))


@dataclass(frozen=True)
class PermutationResult:
    """Sign-flip permutation test of the mean difference: `n_as_extreme` of `n_permutations` sign patterns gave
    |mean| ≥ |observed_mean|. `exact` when every one of the 2^n patterns was enumerated."""

    observed_mean: float
    n_as_extreme: int
    n_permutations: int
    p_value: float
    exact: bool


def sign_flip_permutation_test(
    differences: Float[np.ndarray, " firing"],
    *,
    n_permutations: int = 10_000,
    seed: int | np.random.Generator = 0,
) -> PermutationResult:
    """Two-sided sign-flip permutation test of H0: the paired differences are symmetric about 0.

    Statistic T = mean(d). Each permutation draws independent signs ε_i ∈ {-1, +1} and computes
    T* = mean(ε_i d_i). With k the number of permutations with |T*| ≥ |T| (up to float round-off):

        Monte Carlo (2^n > n_permutations):  p = (k + 1) / (n_permutations + 1)   (never 0; ≥ 1/(B+1))
        exact (2^n ≤ n_permutations):        all 2^n patterns enumerated, p = k / 2^n
    """
    d = _finite_vector("differences", differences)
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be positive, got {n_permutations}")
    observed = float(d.mean())
    tolerance = 1e-9 * float(np.abs(d).mean())
    n = d.size
    if n < 63 and 2**n <= n_permutations:
        patterns = np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)
        signs = 1.0 - 2.0 * (patterns & 1)
        n_as_extreme = int((np.abs(signs @ d / n) >= abs(observed) - tolerance).sum())
        return PermutationResult(observed, n_as_extreme, 2**n, n_as_extreme / 2**n, exact=True)

    rng = _generator(seed)
    n_as_extreme = 0
    chunk = _chunk_rows(n_permutations, n)
    for start in range(0, n_permutations, chunk):
        rows = min(chunk, n_permutations - start)
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(rows, n))
        n_as_extreme += int((np.abs(signs @ d / n) >= abs(observed) - tolerance).sum())
    p_value = (n_as_extreme + 1) / (n_permutations + 1)
    return PermutationResult(observed, n_as_extreme, int(n_permutations), p_value, exact=False)


# --- KL scale: medians per layer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RobustSpread:
    """Median and unscaled median absolute deviation MAD = median |x - median(x)| of n values.

    `standard_error` = MAD / √n, the "±" of the paper's Table 2 (no 1.4826 normal-consistency factor).
    """

    median: float
    mad: float
    n: int

    @property
    def standard_error(self) -> float:
        return self.mad / math.sqrt(self.n)


def robust_spread(values: Float[np.ndarray, " firing"]) -> RobustSpread:
    """Median and unscaled MAD of `values` (see `RobustSpread`)."""
    values = _finite_vector("values", values)
    median = float(np.median(values))
    return RobustSpread(median=median, mad=float(np.median(np.abs(values - median))), n=int(values.size))


@dataclass(frozen=True)
class KLScaleRow:
    """KL medians of one group of firings (a layer, or all of them when `layer` is None).

    `column_ratio_*` = median(KL_cond) / median(KL_atom) (Table 2's "1 : 2.70 : 4.90").
    `firing_ratio_*` = median over firings of KL_cond / KL_atom (Fig. 3's 1.55x and 2.52x), over the firings
    with KL_atom > 0 (NaN if there are none).
    """

    layer: int | None
    n: int
    atom: RobustSpread
    delete: RobustSpread
    random: RobustSpread
    column_ratio_delete: float
    column_ratio_random: float
    firing_ratio_delete: float
    firing_ratio_random: float


def kl_scale_row(
    kl_atom: Float[np.ndarray, " firing"],
    kl_delete: Float[np.ndarray, " firing"],
    kl_random: Float[np.ndarray, " firing"],
    *,
    layer: int | None = None,
) -> KLScaleRow:
    """Median ± MAD/√n per condition, the ratio of medians (atom = 1) and the medians of per-firing ratios."""
    kl_atom, kl_delete, kl_random = _finite_vectors(kl_atom=kl_atom, kl_delete=kl_delete, kl_random=kl_random)
    atom, delete, random = robust_spread(kl_atom), robust_spread(kl_delete), robust_spread(kl_random)
    positive = kl_atom > 0

    def column_ratio(spread: RobustSpread) -> float:
        return spread.median / atom.median if atom.median != 0 else math.nan

    def firing_ratio(kl_condition: np.ndarray) -> float:
        return float(np.median(kl_condition[positive] / kl_atom[positive])) if positive.any() else math.nan

    return KLScaleRow(
        layer=layer,
        n=int(kl_atom.size),
        atom=atom,
        delete=delete,
        random=random,
        column_ratio_delete=column_ratio(delete),
        column_ratio_random=column_ratio(random),
        firing_ratio_delete=firing_ratio(kl_delete),
        firing_ratio_random=firing_ratio(kl_random),
    )


def kl_scale_by_layer(
    layers: Int[np.ndarray, " firing"],
    kl_atom: Float[np.ndarray, " firing"],
    kl_delete: Float[np.ndarray, " firing"],
    kl_random: Float[np.ndarray, " firing"],
) -> tuple[KLScaleRow, ...]:
    """`kl_scale_row` for each layer (ascending), then one pooled row (layer None) over all firings."""
    kl_atom, kl_delete, kl_random = _finite_vectors(kl_atom=kl_atom, kl_delete=kl_delete, kl_random=kl_random)
    layers = np.asarray(layers)
    if layers.shape != kl_atom.shape:
        raise ValueError(f"layers has shape {layers.shape} but the KLs have {kl_atom.shape}")
    rows = []
    for layer in np.unique(layers):
        in_layer = layers == layer
        rows.append(kl_scale_row(kl_atom[in_layer], kl_delete[in_layer], kl_random[in_layer], layer=int(layer)))
    rows.append(kl_scale_row(kl_atom, kl_delete, kl_random, layer=None))
    return tuple(rows)


# --- per-atom population test -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AtomPopulation:
    """Per-atom win rates over the atoms with ≥ `min_firings` firings, and their population summary.

    `mean_win_rate` is the unweighted mean over atoms with a percentile bootstrap interval over atoms;
    `pooled_win_rate` is the firing-level rate over the included atoms' firings. `atom_ids` holds one key per
    included atom, sorted: an id, or a row such as (layer, head, atom) when atoms were given as a composite key.
    """

    atom_ids: Shaped[np.ndarray, "atom *key"]
    firings_per_atom: Int[np.ndarray, " atom"]
    win_rates: Float[np.ndarray, " atom"]
    min_firings: int
    n_candidate_atoms: int
    mean_win_rate: BootstrapInterval
    median_win_rate: float
    min_win_rate: float
    max_win_rate: float
    pooled_win_rate: float

    @property
    def n_atoms(self) -> int:
        return int(self.atom_ids.shape[0])

    @property
    def n_firings(self) -> int:
        return int(self.firings_per_atom.sum())


def per_atom_population(
    atoms: Shaped[np.ndarray, "firing *key"],
    kl_atom: Float[np.ndarray, " firing"],
    kl_delete: Float[np.ndarray, " firing"],
    *,
    min_firings: int = 5,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int | np.random.Generator = 0,
) -> AtomPopulation:
    """Population test over atoms (paper App. F.2).

    For each atom a with n_a ≥ min_firings firings, w_a = (1/n_a) Σ_{firings of a} 1[KL_atom < KL_delete].
    Over the A included atoms: mean w̄ = (1/A) Σ_a w_a with a percentile bootstrap interval (resample the A atoms
    with replacement, `n_resamples` times, quantiles α/2 and 1 - α/2 of the resampled means), median, min and max
    of w_a, and the pooled firing-level rate Σ_a n_a w_a / Σ_a n_a.

    Raises:
        ValueError: if no atom has min_firings firings.
    """
    wins = win_indicator(kl_atom, kl_delete)
    atoms = np.asarray(atoms)
    if atoms.ndim not in (1, 2) or atoms.shape[0] != wins.size:
        raise ValueError(f"atoms has shape {atoms.shape} but there are {wins.size} firings")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    _check_confidence(confidence)

    unique_atoms, inverse, counts = np.unique(
        atoms, axis=0 if atoms.ndim == 2 else None, return_inverse=True, return_counts=True
    )
    win_counts = np.bincount(inverse.reshape(-1), weights=wins.astype(np.float64), minlength=counts.size)
    included = counts >= min_firings
    if not included.any():
        raise ValueError(
            f"no atom has at least {min_firings} firings (most firings of one atom: {int(counts.max())}); "
            "lower min_firings or collect more firings"
        )
    rates = win_counts[included] / counts[included]

    rng = _generator(seed)
    resampled = np.empty(n_resamples)
    chunk = _chunk_rows(n_resamples, rates.size)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        resampled[start:stop] = rates[rng.integers(0, rates.size, size=(stop - start, rates.size))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(resampled, [alpha / 2, 1 - alpha / 2])

    return AtomPopulation(
        atom_ids=unique_atoms[included],
        firings_per_atom=counts[included].astype(np.int64),
        win_rates=rates,
        min_firings=int(min_firings),
        n_candidate_atoms=int(counts.size),
        mean_win_rate=BootstrapInterval(
            estimate=float(rates.mean()), low=float(low), high=float(high), confidence=confidence,
            n_units=int(rates.size), n_resamples=int(n_resamples),
        ),  # fmt: skip
        median_win_rate=float(np.median(rates)),
        min_win_rate=float(rates.min()),
        max_win_rate=float(rates.max()),
        pooled_win_rate=float(win_counts[included].sum() / counts[included].sum()),
    )


# --- everything at once -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubstitutionSummary:
    """All statistics of the substitution test on one record table (see `summarize`)."""

    kl_direction: str
    n_firings: int
    n_passages: int
    n_features: int
    n_atoms: int
    win: Proportion
    win_other_direction: Proportion | None
    feature_bootstrap: BootstrapInterval
    passage_bootstrap: BootstrapInterval
    cliffs_delta: float
    wilcoxon: WilcoxonResult
    permutation: PermutationResult
    strict_chain: Proportion
    kl_scale: tuple[KLScaleRow, ...]
    population: AtomPopulation | None
    floor: FloorSummary | None = None  # the run's numerical floor, for records that carry kl_floor (numerical_floor.py)


def _kl_direction_label(reverse: bool) -> str:
    return "KL(p_cond || p_native)" if reverse else "KL(p_native || p_cond)"


def summarize(
    records: pd.DataFrame,
    *,
    reverse_kl: bool = False,
    n_cluster_resamples: int = 5000,
    n_permutations: int = 10_000,
    n_atom_resamples: int = 10_000,
    min_firings_per_atom: int = 5,
    confidence: float = 0.95,
    seed: int = 0,
) -> SubstitutionSummary:
    """Every statistic of paper §3.5-3.6 on a record table (records.py).

    The KLs are the `kl_*` columns, KL(p_native ‖ p_cond), or the `kl_*_rev` columns with `reverse_kl=True`; the
    win rate in the other direction is added when those columns are all finite. Features are clustered by the
    composite key (layer, head, feature); passages by `passage` alone (the same passages serve every cell). The
    per-atom population groups firings by (layer, head, atom) and is None when no atom reaches
    `min_firings_per_atom`. Each random procedure gets its own generator derived from `seed`.

    Raises:
        ValueError: for an empty table or NaN/infinite KLs in the chosen direction (naming the column).
        KeyError: for missing columns.
    """
    table = validate_records(records)
    if len(table) == 0:
        raise ValueError("the record table is empty: the substitution test produced no firings to summarize")
    kl = {
        condition: _finite_vector(kl_column(condition, reverse=reverse_kl),
                                  table[kl_column(condition, reverse=reverse_kl)].to_numpy())
        for condition in CONDITIONS
    }  # fmt: skip
    kl_atom, kl_delete, kl_random = kl["atom"], kl["delete"], kl["random"]
    other_atom = table[kl_column("atom", reverse=not reverse_kl)].to_numpy()
    other_delete = table[kl_column("delete", reverse=not reverse_kl)].to_numpy()
    other_finite = bool(np.isfinite(other_atom).all() and np.isfinite(other_delete).all())

    feature_keys = table[["layer", "head", "feature"]].to_numpy()
    atom_keys = table[["layer", "head", "atom"]].to_numpy()
    passages = table["passage"].to_numpy()
    wins = win_indicator(kl_atom, kl_delete)
    feature_seed, passage_seed, permutation_seed, atom_seed = np.random.SeedSequence(seed).spawn(4)

    population = None
    if np.bincount(cluster_ids(atom_keys)).max() >= min_firings_per_atom:
        population = per_atom_population(
            atom_keys, kl_atom, kl_delete, min_firings=min_firings_per_atom, n_resamples=n_atom_resamples,
            confidence=confidence, seed=np.random.default_rng(atom_seed),
        )  # fmt: skip

    return SubstitutionSummary(
        kl_direction=_kl_direction_label(reverse_kl),
        n_firings=len(table),
        n_passages=int(np.unique(passages).size),
        n_features=int(np.unique(feature_keys, axis=0).shape[0]),
        n_atoms=int(np.unique(atom_keys, axis=0).shape[0]),
        win=proportion(wins),
        win_other_direction=win_rate(other_atom, other_delete) if other_finite else None,
        feature_bootstrap=cluster_bootstrap_rate(
            wins, feature_keys, n_resamples=n_cluster_resamples, confidence=confidence,
            seed=np.random.default_rng(feature_seed),
        ),  # fmt: skip
        passage_bootstrap=cluster_bootstrap_rate(
            wins, passages, n_resamples=n_cluster_resamples, confidence=confidence,
            seed=np.random.default_rng(passage_seed),
        ),  # fmt: skip
        cliffs_delta=paired_cliffs_delta(kl_atom, kl_delete),
        wilcoxon=wilcoxon_signed_rank(kl_delete - kl_atom),
        permutation=sign_flip_permutation_test(
            kl_delete - kl_atom, n_permutations=n_permutations, seed=np.random.default_rng(permutation_seed)
        ),
        strict_chain=strict_chain_rate(kl_atom, kl_delete, kl_random),
        kl_scale=kl_scale_by_layer(table["layer"].to_numpy(), kl_atom, kl_delete, kl_random),
        population=population,
        floor=floor_summary(table),
    )


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _percent_interval(low: float, high: float) -> str:
    return f"[{100 * low:.2f}, {100 * high:.2f}]"


def _format_p(p_value: float, log10_p: float) -> str:
    if p_value >= 1e-300:
        return f"{p_value:.3g}"
    return f"10^{log10_p:.1f}"


def _format_spread(spread: RobustSpread) -> str:
    return f"{spread.median:.3g} ± {spread.standard_error:.2g}"


def format_summary(summary: SubstitutionSummary) -> str:
    """A readable plain-text table of a `SubstitutionSummary`."""
    win, chain, wilcoxon, permutation = summary.win, summary.strict_chain, summary.wilcoxon, summary.permutation
    level = f"{100 * summary.feature_bootstrap.confidence:g}%"
    lines = [
        f"Substitution test: {summary.n_firings} firings, {summary.n_passages} passages, "
        f"{summary.n_features} features, {summary.n_atoms} substituted atoms; {summary.kl_direction}",
        f"  win rate (KL_atom < KL_delete)     {_percent(win.rate):>8}  "
        f"Wilson 95% {_percent_interval(win.low, win.high)}"
        f"  ({win.successes}/{win.n})",
    ]
    if summary.win_other_direction is not None:
        other = summary.win_other_direction
        lines.append(
            f"    other KL direction               {_percent(other.rate):>8}  "
            f"Wilson 95% {_percent_interval(other.low, other.high)}"
        )
    for label, interval in (("feature", summary.feature_bootstrap), ("passage", summary.passage_bootstrap)):
        lines.append(
            f"    {label}-cluster bootstrap          {level} {_percent_interval(interval.low, interval.high)}"
            f"  ({interval.n_units} clusters, {interval.n_resamples} resamples)"
        )
    lines += [
        f"  strict chain (atom < delete < rand) {_percent(chain.rate):>7}  "
        f"Wilson 95% {_percent_interval(chain.low, chain.high)}  ({chain.successes}/{chain.n})",
        f"  Cliff's delta (paired, delete vs atom) {summary.cliffs_delta:+.3f}",
        f"  Wilcoxon signed-rank (delete - atom)   W+ = {wilcoxon.w_plus:.6g}, W- = {wilcoxon.w_minus:.6g}, "
        f"z = {wilcoxon.z:.2f}, p = {_format_p(wilcoxon.p_value, wilcoxon.log10_p)} "
        f"(log10 p = {wilcoxon.log10_p:.1f}; {wilcoxon.method}, n = {wilcoxon.n_used})",
        f"  sign-flip permutation (mean diff)      p = {permutation.p_value:.3g} "
        f"({permutation.n_as_extreme} of {permutation.n_permutations} as extreme"
        f"{', exact' if permutation.exact else ''})",
    ]
    population = summary.population
    if population is None:
        lines.append("  per-atom population                    n/a (no atom has enough firings)")
    else:
        mean = population.mean_win_rate
        lines.append(
            f"  per-atom population ({population.n_atoms} of {population.n_candidate_atoms} atoms with "
            f">= {population.min_firings} firings, {population.n_firings} firings): mean {_percent(mean.estimate)} "
            f"{level} {_percent_interval(mean.low, mean.high)}, median {_percent(population.median_win_rate)}, "
            f"range {_percent(population.min_win_rate)}-{_percent(population.max_win_rate)}, "
            f"pooled {_percent(population.pooled_win_rate)}"
        )
    if summary.floor is not None:
        floor = summary.floor
        lines.append(
            f"  numerical floor (native vs native)   KL {floor.floor:.2g} (median {floor.median:.2g}); "
            f"{floor.n_below} of {floor.n_firings} firings have a condition KL at or below it"
        )
    lines.append("  median KL ± MAD/sqrt(n):")
    header = ("group", "n", "atom", "delete", "random", "atom:delete:random", "delete/atom", "random/atom")
    widths = (8, 7, 20, 20, 20, 21, 13, 12)
    lines.append("    " + "".join(text.ljust(width) for text, width in zip(header, widths)).rstrip())
    for row in summary.kl_scale:
        cells = (
            "pooled" if row.layer is None else f"L{row.layer}",
            str(row.n),
            _format_spread(row.atom),
            _format_spread(row.delete),
            _format_spread(row.random),
            f"1 : {row.column_ratio_delete:.2f} : {row.column_ratio_random:.2f}",
            f"{row.firing_ratio_delete:.2f}x",
            f"{row.firing_ratio_random:.2f}x",
        )
        lines.append("    " + "".join(text.ljust(width) for text, width in zip(cells, widths)).rstrip())
    return "\n".join(lines)
