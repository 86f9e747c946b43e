"""The baselines' comparison table carries each run's numerical floor (issue #18): ``replacement_test`` records
have ``kl_floor``; the table reports the run's floor and the firings at or below it; older records give NaN / -1."""

import pytest
import torch

from sae_checks import firing_sae
from writesae_lens.evaluation.baselines import compare_substitution
from writesae_lens.evaluation.numerical_floor import floor_summary
from writesae_lens.evaluation.substitution import replacement_test

pytestmark = pytest.mark.usefixtures("one_thread")


def test_comparison_table_reports_the_floor(qwen35_pair):
    model = qwen35_pair[1]
    passages = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(3))
    sae = firing_sae(model, passages, 1, 2)
    records = replacement_test(model, sae, 1, 2, passages, max_firings=10, progress=False)
    table = compare_substitution({"a": records, "old": records.drop(columns=["kl_floor", "below_floor"])})
    table = table.set_index("substitute")
    expected = floor_summary(records)
    assert table.loc["a", "floor"] == pytest.approx(expected.floor) and table.loc["a", "below_floor"] == expected.n_below
    assert table.loc["old", "below_floor"] == -1 and table["floor"].isna()["old"]
