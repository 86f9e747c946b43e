"""Statistics of the substitution test (writesae_lens.evaluation.stats) and the record table (records.py).

Reference values: the paper's Wilson intervals, hand-computed statistics of a ten-firing table (worked out in
`HAND`), exact enumeration of small sign-flip distributions, and scipy where it is installed.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from writesae_lens.evaluation import records as rec
from writesae_lens.evaluation import stats

# --- a ten-firing table with hand-computed statistics -----------------------------------------------------------
#
#  firing  atom delete random   d=del-atom  win  chain  layer passage feature atom_id
#    0       1     5      9          4       W     C      1      0      10     100
#    1       2     4      3          2       W     -      1      1      10     100
#    2       6     3     10         -3       -     -      1      2      11     100
#    3       3     9     12          6       W     C      1      3      11     100
#    4       5     5      8          0    (tie)    -      1      4      12     100
#    5       4    10     20          6       W     C      9      0      13     100
#    6       2     8      8          6       W  (tie)     9      1      13     200
#    7       7    14     21          7       W     C      9      2      14     200
#    8       9     6      7         -3       -     -      9      3      14     200
#    9       1     3      6          2       W     C      9      4      14     200
#
# win 7/10, strict chain 5/10, paired Cliff's delta (7 - 2)/10 = 0.5.
# Wilcoxon (zeros dropped, n = 9): |d| sorted 2 2 3 3 4 6 6 6 7 -> ranks 1.5 1.5 3.5 3.5 5 7 7 7 9;
#   W- = 3.5 + 3.5 = 7, W+ = 45 - 7 = 38; E = 9*10/4 = 22.5;
#   Var = (9*10*19 - (6 + 6 + 24)/2) / 24 = 1692/24 = 70.5 (ties {2,2}, {3,3}, {6,6,6}).
# Medians: atom 1 1 2 2 3 4 5 6 7 9 -> 3.5, MAD 2.0; delete 3 3 4 5 5 6 8 9 10 14 -> 5.5, MAD 2.5;
#   random 3 6 7 8 8 9 10 12 20 21 -> 8.5, MAD 2.0. Column ratios 5.5/3.5, 8.5/3.5.
# Per-firing ratios: delete/atom sorted 0.5 .667 1 2 2 2.5 3 3 4 5 -> 2.25; random/atom -> (3 + 4)/2 = 3.5.
# Layer 1: atom median 3 (MAD 2), delete median 5; layer 9: atom median 4, delete median 8.
# Atoms: 100 has 6 firings, 4 wins; 200 has 4 firings, 3 wins.

KL_ATOM = np.array([1, 2, 6, 3, 5, 4, 2, 7, 9, 1], dtype=float)
KL_DELETE = np.array([5, 4, 3, 9, 5, 10, 8, 14, 6, 3], dtype=float)
KL_RANDOM = np.array([9, 3, 10, 12, 8, 20, 8, 21, 7, 6], dtype=float)
LAYERS = np.array([1, 1, 1, 1, 1, 9, 9, 9, 9, 9])
PASSAGES = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
FEATURES = np.array([10, 10, 11, 11, 12, 13, 13, 14, 14, 14])
ATOM_IDS = np.array([100] * 6 + [200] * 4)


def hand_table(**overrides: np.ndarray) -> pd.DataFrame:
    """The ten-firing table as a record DataFrame (reverse KLs = forward KLs doubled, top-1 ids made up)."""
    n = KL_ATOM.size
    columns = {
        "passage": PASSAGES,
        "position": np.arange(n) + 7,
        "layer": LAYERS,
        "head": np.full(n, 4),
        "feature": FEATURES,
        "atom": ATOM_IDS,
        "coefficient": np.linspace(0.1, 1.0, n),
        "native_write_norm": np.linspace(1.0, 2.0, n),
        "kl_atom": KL_ATOM,
        "kl_delete": KL_DELETE,
        "kl_random": KL_RANDOM,
        "kl_atom_rev": 2 * KL_ATOM,
        "kl_delete_rev": 2 * KL_DELETE,
        "kl_random_rev": 2 * KL_RANDOM,
        "top1_native": np.full(n, 13),
        "top1_atom": np.full(n, 13),
        "top1_delete": np.arange(n),
        "top1_random": np.arange(n) + 100,
    }
    columns.update(overrides)
    return pd.DataFrame(columns)


# --- proportions --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "expected_low", "expected_high"),
    [(4481, 4851, 0.9159, 0.9309), (2202, 2500, 0.8675, 0.8929)],
    ids=["pooled-4851", "mamba2-2500"],
)
def test_wilson_interval_reproduces_paper_values(successes, n, expected_low, expected_high):
    low, high = stats.wilson_interval(successes, n)
    assert low == pytest.approx(expected_low, abs=5e-5)
    assert high == pytest.approx(expected_high, abs=5e-5)


def test_wilson_interval_matches_its_formula_and_edges():
    # p = 7/10, z = 1.96: centre (0.7 + 0.19208) / 1.38416, half-width 1.96 sqrt(0.021 + 0.009604) / 1.38416
    low, high = stats.wilson_interval(7, 10)
    centre, half = (0.7 + 1.96**2 / 20) / (1 + 1.96**2 / 10), 1.96 * math.sqrt(0.021 + 1.96**2 / 400) / 1.38416
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-5)
    assert stats.wilson_interval(0, 20)[0] == 0.0
    assert stats.wilson_interval(20, 20)[1] == 1.0
    with pytest.raises(ValueError, match="n > 0"):
        stats.wilson_interval(0, 0)


def test_win_and_strict_chain_rates_on_hand_table():
    win = stats.win_rate(KL_ATOM, KL_DELETE)
    assert (win.successes, win.n, win.rate) == (7, 10, 0.7)
    assert (win.low, win.high) == stats.wilson_interval(7, 10)
    chain = stats.strict_chain_rate(KL_ATOM, KL_DELETE, KL_RANDOM)
    assert (chain.successes, chain.rate) == (5, 0.5)
    assert stats.strict_chain_indicator(KL_ATOM, KL_DELETE, KL_RANDOM).tolist() == [
        True, False, False, True, False, True, False, True, False, True,
    ]  # fmt: skip


def test_ties_are_losses_and_all_wins_saturate():
    tied = np.ones(6)
    assert stats.win_rate(tied, tied).successes == 0
    assert stats.paired_cliffs_delta(tied, tied) == 0.0
    all_wins = stats.win_rate(np.ones(6), np.full(6, 2.0))
    assert all_wins.rate == 1.0 and all_wins.high == 1.0 and all_wins.low < 1.0
    assert stats.paired_cliffs_delta(np.ones(6), np.full(6, 2.0)) == 1.0


# --- effect size and tests ----------------------------------------------------------------------------------------


def test_paired_cliffs_delta_is_mean_sign_and_2win_minus_1_without_ties():
    assert stats.paired_cliffs_delta(KL_ATOM, KL_DELETE) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    kl_atom = rng.uniform(1, 2, size=1000)
    kl_delete = kl_atom + np.where(np.arange(1000) < 912, 0.5, -0.5)  # win 0.912
    assert stats.paired_cliffs_delta(kl_atom, kl_delete) == pytest.approx(0.824)


def test_wilcoxon_normal_approximation_on_hand_table():
    result = stats.wilcoxon_signed_rank(KL_DELETE - KL_ATOM, method="normal")
    assert (result.n_used, result.n_zero) == (9, 1)
    assert (result.w_plus, result.w_minus, result.statistic) == (38.0, 7.0, 7.0)
    z = 15.5 / math.sqrt(70.5)
    assert result.z == pytest.approx(z, rel=1e-12)
    assert result.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-10)
    assert result.log10_p == pytest.approx(math.log10(math.erfc(z / math.sqrt(2))), rel=1e-10)
    # auto falls back to the normal approximation because of the ties
    assert stats.wilcoxon_signed_rank(KL_DELETE - KL_ATOM).method == "normal"


def test_wilcoxon_pratt_keeps_zeros_in_the_ranking():
    # d = 0, 1, -2, 3: |d| ranks 1, 2, 3, 4 -> W+ = 2 + 4, W- = 3; n = 4, n0 = 1:
    # E = (4*5 - 1*2)/4 = 4.5, Var = (4*5*9 - 1*2*3)/24 = 174/24
    result = stats.wilcoxon_signed_rank(np.array([0.0, 1.0, -2.0, 3.0]), zero_method="pratt")
    assert (result.w_plus, result.w_minus, result.n_used) == (6.0, 3.0, 4)
    assert result.z == pytest.approx((6 - 4.5) / math.sqrt(174 / 24))


def exact_two_sided_p_by_enumeration(differences: np.ndarray) -> float:
    """Reference: W+ over all 2^n sign patterns of the ranks 1..n (untied, non-zero differences)."""
    n = differences.size
    ranks = np.argsort(np.argsort(np.abs(differences))) + 1
    observed = ranks[differences > 0].sum()
    sums = np.array([sum(r for r, positive in zip(ranks, signs) if positive)
                     for signs in itertools.product([False, True], repeat=n)])  # fmt: skip
    return min(1.0, 2 * min(np.mean(sums <= observed), np.mean(sums >= observed)))


@pytest.mark.parametrize("n", [6, 8, 10])
def test_wilcoxon_exact_matches_enumeration_and_normal_is_close(n):
    rng = np.random.default_rng(n)
    differences = rng.normal(0.4, 1.0, size=n)
    reference = exact_two_sided_p_by_enumeration(differences)
    exact = stats.wilcoxon_signed_rank(differences, method="exact")
    assert exact.method == "exact" and stats.wilcoxon_signed_rank(differences).method == "exact"
    assert exact.p_value == pytest.approx(reference, rel=1e-12)
    normal = stats.wilcoxon_signed_rank(differences, method="normal")  # a ballpark at this n
    assert abs(normal.p_value - reference) < 0.05 + 0.1 * reference


def test_wilcoxon_exact_refuses_ties():
    with pytest.raises(ValueError, match="ties"):
        stats.wilcoxon_signed_rank(np.array([1.0, 1.0, -2.0, 3.0]), method="exact")


@pytest.mark.parametrize("zero_method", ["wilcox", "pratt"])
@pytest.mark.parametrize("n", [12, 300])
def test_wilcoxon_matches_scipy(zero_method, n):
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(n)
    differences = np.round(rng.normal(0.2, 1.0, size=n), 1)  # rounding makes ties
    differences[:2] = 0.0
    ours = stats.wilcoxon_signed_rank(differences, zero_method=zero_method, method="normal", continuity=True)
    theirs = scipy_stats.wilcoxon(differences, zero_method=zero_method, method="asymptotic", correction=True)
    assert ours.statistic == pytest.approx(theirs.statistic)
    assert abs(ours.z) == pytest.approx(abs(theirs.zstatistic), rel=1e-10)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)


def test_log_erfc_is_exact_below_underflow_and_asymptotic_beyond():
    for x in [0.0, 0.5, 2.9, 3.0, 5.0, 12.0, 25.0]:
        assert stats.log_erfc(x) == pytest.approx(math.log(math.erfc(x)), rel=1e-12)
    for x in [40.0, 100.0, 1000.0]:  # erfc(x) = e^{-x²}/(x√π) (1 - 1/(2x²) + 3/(4x⁴) - ...)
        series = -x * x - math.log(x * math.sqrt(math.pi)) + math.log1p(-1 / (2 * x * x) + 3 / (4 * x**4))
        assert stats.log_erfc(x) == pytest.approx(series, rel=1e-12)


def test_wilcoxon_reports_log10_p_far_below_float_range():
    n = 5000  # all positive and untied: W+ = n(n+1)/2, z = (n(n+1)/4) / sqrt(n(n+1)(2n+1)/24) ≈ 61
    result = stats.wilcoxon_signed_rank(np.arange(1, n + 1, dtype=float), method="normal")
    z = (n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    assert result.z == pytest.approx(z)
    assert result.p_value == 0.0  # underflows, but:
    assert result.log10_p == pytest.approx(stats.log_erfc(z / math.sqrt(2)) / math.log(10))
    assert -820 < result.log10_p < -800
    special = pytest.importorskip("scipy.special")
    assert result.log10_p == pytest.approx((math.log(2) + special.log_ndtr(-z)) / math.log(10), rel=1e-10)


def test_wilcoxon_without_nonzero_differences_is_degenerate():
    result = stats.wilcoxon_signed_rank(np.zeros(5))
    assert (result.method, result.p_value, result.log10_p) == ("degenerate", 1.0, 0.0)


def test_sign_flip_permutation_exact_enumeration():
    # d = 1, 2, 3: only the all-plus and all-minus patterns reach |mean| = 2 -> p = 2/8
    result = stats.sign_flip_permutation_test(np.array([1.0, 2.0, 3.0]))
    assert result.exact and (result.n_as_extreme, result.n_permutations, result.p_value) == (2, 8, 0.25)
    # d = 1, -1, 2: sum 2; of the 8 sums ±1 ±1 ±2 the values are ±4 (2 patterns), ±2 (4), 0 (2) -> 6 reach |2|
    result = stats.sign_flip_permutation_test(np.array([1.0, -1.0, 2.0]))
    assert (result.n_as_extreme, result.p_value) == (6, 0.75)


def test_sign_flip_permutation_monte_carlo_is_seeded_and_bounded():
    differences = np.arange(1.0, 21.0)  # 2^20 patterns > 10^4: Monte Carlo; only 2 patterns are as extreme
    result = stats.sign_flip_permutation_test(differences, n_permutations=2000, seed=3)
    assert not result.exact and result.n_permutations == 2000
    assert result.p_value == pytest.approx((result.n_as_extreme + 1) / 2001)
    assert result.n_as_extreme <= 2
    assert stats.sign_flip_permutation_test(differences, n_permutations=2000, seed=3) == result
    noise = np.random.default_rng(0).normal(size=40)
    assert stats.sign_flip_permutation_test(noise, n_permutations=500).p_value > 0.05


# --- cluster bootstrap --------------------------------------------------------------------------------------------


def naive_cluster_bootstrap(outcomes, clusters, n_resamples, seed):
    """Reference: one resample at a time, concatenating the drawn clusters' firings."""
    labels = np.unique(clusters)
    members = [outcomes[clusters == label] for label in labels]
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(n_resamples):
        drawn = rng.integers(0, labels.size, size=labels.size)
        rates.append(np.concatenate([members[i] for i in drawn]).mean())
    return np.quantile(rates, [0.025, 0.975])


def test_cluster_bootstrap_matches_naive_resampling():
    rng = np.random.default_rng(1)
    clusters = rng.integers(0, 12, size=200)
    outcomes = rng.random(200) < 0.3 + 0.05 * clusters
    result = stats.cluster_bootstrap_rate(outcomes, clusters, n_resamples=300, seed=5)
    assert (result.low, result.high) == pytest.approx(tuple(naive_cluster_bootstrap(outcomes, clusters, 300, 5)))
    assert result.estimate == pytest.approx(outcomes.mean())
    assert result.n_units == np.unique(clusters).size and result.n_resamples == 300


def test_cluster_bootstrap_edges():
    # identical clusters -> no spread
    outcomes = np.tile([True, True, False], 4)
    same = stats.cluster_bootstrap_rate(outcomes, np.repeat(np.arange(4), 3), n_resamples=200)
    assert same.low == pytest.approx(2 / 3) and same.high == pytest.approx(2 / 3)
    # one all-win and one all-loss cluster: resampled rates are 0, 1/2, 1 -> the interval is [0, 1]
    split = stats.cluster_bootstrap_rate(np.array([True] * 3 + [False] * 3), np.repeat([0, 1], 3), n_resamples=500)
    assert (split.low, split.high) == (0.0, 1.0)


def test_cluster_ids_accept_composite_keys():
    keys = np.array([[1, 4, 412], [9, 4, 412], [1, 4, 412], [9, 4, 87]])
    assert stats.cluster_ids(keys).tolist() == [0, 2, 0, 1]
    assert stats.cluster_ids(np.array([5, 3, 5])).tolist() == [1, 0, 1]


# --- KL scale -----------------------------------------------------------------------------------------------------


def test_kl_scale_row_on_hand_table():
    row = stats.kl_scale_row(KL_ATOM, KL_DELETE, KL_RANDOM)
    assert (row.atom.median, row.atom.mad) == (3.5, 2.0)
    assert (row.delete.median, row.delete.mad) == (5.5, 2.5)
    assert (row.random.median, row.random.mad) == (8.5, 2.0)
    assert row.atom.standard_error == pytest.approx(2.0 / math.sqrt(10))
    assert row.column_ratio_delete == pytest.approx(5.5 / 3.5)
    assert row.column_ratio_random == pytest.approx(8.5 / 3.5)
    assert row.firing_ratio_delete == pytest.approx(2.25)
    assert row.firing_ratio_random == pytest.approx(3.5)


def test_kl_scale_by_layer_groups_then_pools():
    rows = stats.kl_scale_by_layer(LAYERS, KL_ATOM, KL_DELETE, KL_RANDOM)
    assert [row.layer for row in rows] == [1, 9, None]
    assert [row.n for row in rows] == [5, 5, 10]
    assert (rows[0].atom.median, rows[0].atom.mad, rows[0].delete.median) == (3.0, 2.0, 5.0)
    assert (rows[1].atom.median, rows[1].delete.median) == (4.0, 8.0)
    assert rows[2] == stats.kl_scale_row(KL_ATOM, KL_DELETE, KL_RANDOM)


# --- per-atom population ------------------------------------------------------------------------------------------


def test_per_atom_population_on_hand_table():
    only_large = stats.per_atom_population(ATOM_IDS, KL_ATOM, KL_DELETE, n_resamples=200)
    assert only_large.atom_ids.tolist() == [100] and only_large.n_candidate_atoms == 2
    assert only_large.win_rates.tolist() == pytest.approx([4 / 6])

    both = stats.per_atom_population(ATOM_IDS, KL_ATOM, KL_DELETE, min_firings=4, n_resamples=2000, seed=1)
    assert both.atom_ids.tolist() == [100, 200] and both.firings_per_atom.tolist() == [6, 4]
    assert both.mean_win_rate.estimate == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert both.median_win_rate == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert (both.min_win_rate, both.max_win_rate) == pytest.approx((4 / 6, 3 / 4))
    assert both.pooled_win_rate == pytest.approx(0.7)
    # resampled means of two atoms take the values 4/6, their mean, 3/4 with probabilities 1/4, 1/2, 1/4
    assert (both.mean_win_rate.low, both.mean_win_rate.high) == pytest.approx((4 / 6, 3 / 4))
    assert (both.n_atoms, both.n_firings) == (2, 10)


def test_per_atom_population_needs_enough_firings():
    with pytest.raises(ValueError, match="at least 7 firings"):
        stats.per_atom_population(ATOM_IDS, KL_ATOM, KL_DELETE, min_firings=7)


# --- input checks -------------------------------------------------------------------------------------------------


def test_empty_and_nan_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        stats.win_rate(np.array([]), np.array([]))
    with_nan = KL_DELETE.copy()
    with_nan[3] = np.nan
    with pytest.raises(ValueError, match=r"kl_delete has 1 NaN.*index 3"):
        stats.win_rate(KL_ATOM, with_nan)
    with pytest.raises(ValueError, match="NaN"):
        stats.wilcoxon_signed_rank(with_nan)
    with pytest.raises((ValueError, TypeError)):  # TypeError from jaxtyping's shape check when it is active
        stats.win_rate(KL_ATOM, KL_DELETE[:5])


# --- summarize ----------------------------------------------------------------------------------------------------


def test_summarize_hand_table():
    summary = stats.summarize(hand_table(), n_cluster_resamples=200, n_permutations=500, n_atom_resamples=200,
                              min_firings_per_atom=4)  # fmt: skip
    assert (summary.n_firings, summary.n_passages, summary.n_features, summary.n_atoms) == (10, 5, 5, 3)
    assert summary.win.rate == 0.7 and summary.strict_chain.rate == 0.5
    assert summary.win_other_direction.rate == 0.7  # reverse KLs are the forward ones doubled
    assert summary.cliffs_delta == pytest.approx(0.5)
    assert summary.wilcoxon.w_plus == 38.0
    assert summary.feature_bootstrap.n_units == 5 and summary.passage_bootstrap.n_units == 5
    assert [row.layer for row in summary.kl_scale] == [1, 9, None]
    # atoms are keyed by (layer, head, atom): (1, 4, 100) has 5 firings, (9, 4, 100) 1, (9, 4, 200) 4
    assert summary.population.atom_ids.tolist() == [[1, 4, 100], [9, 4, 200]]
    assert (summary.population.n_atoms, summary.population.n_candidate_atoms, summary.population.n_firings) == (2, 3, 9)
    assert summary.population.win_rates.tolist() == pytest.approx([3 / 5, 3 / 4])

    text = stats.format_summary(summary)
    rerun = stats.summarize(hand_table(), n_cluster_resamples=200, n_permutations=500, n_atom_resamples=200,
                            min_firings_per_atom=4)  # fmt: skip
    assert stats.format_summary(rerun) == text  # seeded
    for expected in [
        "10 firings", "70.00%", "(7/10)", "50.00%", "+0.500", "W+ = 38", "pooled", "L9", "1 : 1.57 : 2.43",
    ]:  # fmt: skip
        assert expected in text, expected


def test_summarize_keys_features_and_atoms_by_cell():
    # the same feature / atom id in two layers is two features / atoms
    table = hand_table(feature=np.full(10, 7))
    summary = stats.summarize(table, n_cluster_resamples=50, n_permutations=50, n_atom_resamples=50)
    assert summary.n_features == 2 and summary.feature_bootstrap.n_units == 2
    assert summary.population.atom_ids.tolist() == [[1, 4, 100]]  # the only atom with >= 5 firings
    assert summary.population.win_rates.tolist() == pytest.approx([3 / 5])


def test_summarize_without_population_and_with_reverse_kl():
    summary = stats.summarize(hand_table(), reverse_kl=True, min_firings_per_atom=50,
                              n_cluster_resamples=50, n_permutations=50)  # fmt: skip
    assert summary.population is None
    assert summary.kl_direction == "KL(p_cond || p_native)"
    assert summary.kl_scale[-1].atom.median == 7.0
    assert "n/a" in stats.format_summary(summary)


def test_summarize_rejects_empty_records_and_nan_kls():
    with pytest.raises(ValueError, match="empty"):
        stats.summarize(rec.empty_records())
    with pytest.raises(ValueError, match="kl_random has 1 NaN"):
        stats.summarize(hand_table(kl_random=np.where(np.arange(10) == 2, np.nan, KL_RANDOM)))
    # NaN only in the other direction: the summary still runs, without the other-direction win rate
    partial = stats.summarize(hand_table(kl_atom_rev=np.full(10, np.nan)), n_cluster_resamples=20, n_permutations=20)
    assert partial.win_other_direction is None
    with pytest.raises(KeyError, match="kl_delete"):
        stats.summarize(hand_table().drop(columns=["kl_delete"]))


def test_format_summary_prints_tiny_p_values_as_powers_of_ten():
    n = 4000
    kl_atom = np.linspace(0.1, 1.0, n)
    table = pd.DataFrame({name: np.zeros(n, dtype=np.int64) for name in rec.INTEGER_COLUMNS})
    for name in rec.FLOAT_COLUMNS:
        table[name] = kl_atom
    for name in ("kl_delete", "kl_delete_rev"):
        table[name] = kl_atom + np.linspace(0.5, 1.5, n)
    table["kl_random"] = table["kl_random_rev"] = kl_atom + 3
    table["passage"] = np.arange(n) % 100
    summary = stats.summarize(table, n_cluster_resamples=50, n_permutations=50, n_atom_resamples=50)
    assert summary.wilcoxon.p_value == 0.0 or summary.wilcoxon.p_value < 1e-300
    assert "p = 10^-" in stats.format_summary(summary)


# --- record table -------------------------------------------------------------------------------------------------


def test_record_columns_and_column_helpers():
    assert rec.RECORD_COLUMNS[:2] == ("passage", "position")
    assert {"kl_atom", "kl_delete_rev", "top1_native", "top1_random"} <= set(rec.RECORD_COLUMNS)
    assert set(rec.INTEGER_COLUMNS) | set(rec.FLOAT_COLUMNS) == set(rec.RECORD_COLUMNS)
    assert rec.kl_column("delete") == "kl_delete" and rec.kl_column("random", reverse=True) == "kl_random_rev"
    assert rec.top1_column("native") == "top1_native"
    with pytest.raises(ValueError):
        rec.kl_column("native")


def test_records_frame_from_firing_records():
    firing = rec.FiringRecord(
        passage=3, position=17, layer=9, head=4, feature=412, atom=87, coefficient=0.31, native_write_norm=1.5,
        kl_atom=0.4, kl_delete=1.1, kl_random=2.0, kl_atom_rev=0.5, kl_delete_rev=1.0, kl_random_rev=2.2,
        top1_native=13, top1_atom=13, top1_delete=98818, top1_random=5,
    )  # fmt: skip
    table = rec.records_frame([firing, firing])
    assert list(table.columns) == list(rec.RECORD_COLUMNS) and len(table) == 2
    assert table["feature"].dtype == np.int64 and table["kl_atom"].dtype == np.float64
    assert len(rec.records_frame([])) == 0


def test_validate_records_names_missing_and_bad_columns():
    with pytest.raises(KeyError, match=r"\['atom', 'kl_random'\]"):
        rec.validate_records(hand_table().drop(columns=["kl_random", "atom"]))
    with pytest.raises(TypeError, match="passage"):
        rec.validate_records(hand_table(passage=np.array(["a"] * 10)))
    with pytest.raises(TypeError, match="layer"):
        rec.validate_records(hand_table(layer=np.full(10, 1.5)))
    table = rec.validate_records(hand_table(layer=np.full(10, 9.0), extra_note=np.arange(10)))
    assert table["layer"].dtype == np.int64 and list(table.columns)[-1] == "extra_note"


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_save_and_load_round_trip(tmp_path, suffix):
    if suffix == ".parquet" and not rec.pyarrow_available():
        pytest.skip("pyarrow is not installed")
    table = hand_table(kl_atom=KL_ATOM / 3, kl_random_rev=np.where(np.arange(10) == 0, np.nan, KL_RANDOM))
    path = rec.save_records(table, tmp_path / f"records{suffix}")
    loaded = rec.load_records(path)
    pd.testing.assert_frame_equal(loaded, rec.validate_records(table))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_save_refuses_to_overwrite_and_writes_atomically(tmp_path):
    path = rec.save_records(hand_table(), tmp_path / "records.csv")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rec.save_records(hand_table(kl_atom=KL_ATOM + 1), path)
    assert path.read_bytes() == before
    rec.save_records(hand_table(kl_atom=KL_ATOM + 1), path, overwrite=True)
    assert rec.load_records(path)["kl_atom"].tolist() == (KL_ATOM + 1).tolist()

    def failing_write(temporary):
        temporary.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        rec.write_atomically(tmp_path / "never.csv", failing_write, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.csv"]
