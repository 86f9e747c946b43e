"""The steering protocols' statistics against scipy called directly on known data."""

import numpy as np
import pytest
from scipy import stats as sps

from writesae_lens.generation.stats import (bonferroni, bootstrap_interval, cohens_dz, mcnemar_exact,
                                            paired_difference, signed_rank_p)
from writesae_lens.generation.targets import ranks_from_logits


def test_mcnemar_exact_is_the_binomial_test_of_discordant_pairs():
    first = np.array([1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    second = np.array([0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0], dtype=bool)
    result = mcnemar_exact(first, second)
    assert (result.only_first, result.only_second) == (7, 1)
    assert result.p_value == pytest.approx(sps.binomtest(7, 8, 0.5).pvalue)
    assert result.p_value == pytest.approx(0.0703125)  # 2 * (1 + 8) / 256
    assert mcnemar_exact(first, first).p_value == 1.0


def test_paired_difference_equals_scipy():
    rng = np.random.default_rng(0)
    base = rng.normal(10, 2, 40)
    treated = base - 1.5 + rng.normal(0, 1, 40)
    result = paired_difference(treated, base, n_resamples=2000)
    reference = sps.ttest_rel(treated, base)
    assert result.t == pytest.approx(reference.statistic)
    assert result.p_value == pytest.approx(reference.pvalue)
    diff = treated - base
    assert result.cohens_dz == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert result.ci_low < diff.mean() < result.ci_high
    assert cohens_dz(np.array([1.0, 2.0, 3.0])) == pytest.approx(2.0)


def test_bootstrap_interval_equals_scipy_percentile_bootstrap_closely():
    values = np.random.default_rng(1).exponential(1.0, 150)
    ours = bootstrap_interval(values, np.median, n_resamples=20000, seed=3)
    ref = sps.bootstrap((values,), np.median, n_resamples=20000, method="percentile",
                        random_state=np.random.default_rng(4)).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.03) and ours[1] == pytest.approx(ref.high, abs=0.03)


def test_bonferroni_and_signed_rank():
    assert bonferroni([0.001, 0.3, 0.02]).tolist() == pytest.approx([0.003, 0.9, 0.06])
    assert bonferroni([0.4], n_tests=4).tolist() == [1.0]
    values = np.array([-0.5, -0.2, 0.1, -0.9, -0.3, -0.05, 0.2, -0.7, -1.1, -0.4])
    assert signed_rank_p(values) == pytest.approx(sps.wilcoxon(values).pvalue)
    assert signed_rank_p(np.zeros(5)) == 1.0


def test_ranks_from_logits_count_larger_logits():
    import torch

    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0, 0.1]])
    assert ranks_from_logits(logits).tolist() == [[3, 1, 5, 1, 4]]
    big = torch.randn(3, 50)
    expected = 1 + (big[:, None, :] > big[:, :, None]).sum(-1)
    assert torch.equal(ranks_from_logits(big), expected)
