"""Reconstruction in the cache (``evaluation.cache_reconstruction``) on every family, against the straightforward
protocol: per passage and condition, the prefix rerun at batch 1, the state replaced in its cache, the suffix loss."""

import numpy as np
import pandas as pd
import pytest
import torch

from reconstruction_reference import straightforward
from sae_checks import firing_sae
from writesae_lens.evaluation.cache_reconstruction import (
    identity_splice,
    reconstruction_sweep,
    reconstruction_table,
    sae_splice,
    standard_conditions,
    svd_splice,
    truncate_rank,
)
from family_models import family_model

LAYER, HEAD, PREFIX = 1, 2, 17


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen35", "mamba2", "rwkv7"])
def family(request, qwen35_pair, mamba2_pair):
    model = family_model(request.param, qwen35_pair, mamba2_pair)
    passages = torch.randint(0, 90, (3, 40), generator=torch.Generator().manual_seed(5))
    return model, passages


def test_sweep_equals_the_straightforward_protocol(family):
    model, passages = family
    assert model.cfg.d_k != model.cfg.d_v
    heads = list(range(model.cfg.n_heads))
    saes = {"one_head": {HEAD: firing_sae(model, passages, LAYER, HEAD)},
            "all_heads": {h: firing_sae(model, passages, LAYER, h, seed=h) for h in heads}}
    conditions = {"one_head": sae_splice(saes["one_head"]), "all_heads": sae_splice(saes["all_heads"]),
                  "rank_1": svd_splice(1, [HEAD]), "rank_2_all": svd_splice(2, heads)}
    table = reconstruction_sweep(model, LAYER, passages, conditions, prefix_len=PREFIX, passage_batch_size=2,
                                 row_batch_size=5, progress=False)
    reference = straightforward(model, LAYER, passages, conditions, PREFIX)
    assert len(table) == len(reference) == 3 * 5
    worst = max(abs(r.nll - reference[(r.passage, r.condition)]) for r in table.itertuples())
    assert worst < 1e-5, worst
    assert (table.tokens == passages.shape[1] - PREFIX - 1).all()
    native = table[table.condition == "native"].nll.to_numpy()
    assert not np.allclose(table[table.condition == "rank_1"].nll.to_numpy(), native)  # the splice does something


def test_identity_and_full_rank_leave_the_loss_unchanged(family):
    model, passages = family
    heads = list(range(model.cfg.n_heads))
    full = min(model.cfg.d_k, model.cfg.d_v)
    conditions = {"identity": identity_splice(heads), "full_rank": svd_splice(full, heads)}
    table = reconstruction_sweep(model, LAYER, passages, conditions, prefix_len=PREFIX, progress=False)
    by = table.pivot(index="passage", columns="condition", values="nll")
    assert (by["identity"] - by["native"]).abs().max() < 1e-6
    assert (by["full_rank"] - by["native"]).abs().max() < 1e-6


def test_truncate_rank_against_numpy():
    states = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(0))
    for rank in (1, 2, 4, 5, 9):
        u, s, vh = np.linalg.svd(states.double().numpy(), full_matrices=False)
        r = min(rank, 5)
        expected = np.einsum("...ir,...r,...rj->...ij", u[..., :r], s[..., :r], vh[..., :r, :])
        np.testing.assert_allclose(truncate_rank(states, rank).numpy(), expected, atol=1e-5)
    assert torch.linalg.matrix_rank(truncate_rank(states, 2).double(), atol=1e-4).max() == 2


def test_table_is_the_token_weighted_perplexity():
    rows = pd.DataFrame({"passage": [0, 1, 0, 1], "condition": ["native", "native", "x", "x"],
                         "nll": [2.0, 3.0, 2.5, 3.0], "tokens": [10, 30, 10, 30]})
    table = reconstruction_table(rows).set_index("condition")
    assert table.loc["native", "loss"] == pytest.approx((20 + 90) / 40)
    assert table.loc["x", "ppl"] == pytest.approx(np.exp((25 + 90) / 40))
    assert table.loc["x", "ppl_change_pct"] == pytest.approx(100 * (np.exp(115 / 40) / np.exp(110 / 40) - 1))


def test_standard_conditions_and_bad_input(qwen35_pair):
    model = qwen35_pair[1]
    passages = torch.randint(0, 90, (2, 20))
    sae = firing_sae(model, passages, LAYER, HEAD)
    conditions = standard_conditions(model, [HEAD], {"writesae": {HEAD: sae}}, ranks=(1, 2, 4, 8, 16, 32))
    full = min(model.cfg.d_k, model.cfg.d_v)
    assert list(conditions) == ["writesae", *(f"svd_rank_{r}" for r in (1, 2, 4, 8, 16, 32) if r < full)]
    with pytest.raises(ValueError, match="heads"):
        standard_conditions(model, [0, 1], {"writesae": {HEAD: sae}})
    with pytest.raises(ValueError, match="not a recurrent layer"):
        reconstruction_sweep(model, 3, passages, conditions, progress=False)
    with pytest.raises(ValueError, match="prefix_len"):
        reconstruction_sweep(model, LAYER, passages, conditions, prefix_len=19, progress=False)
    with pytest.raises(ValueError, match="native"):
        reconstruction_sweep(model, LAYER, passages, {"native": svd_splice(1, [0])}, progress=False)
    with pytest.raises(ValueError, match="heads"):
        reconstruction_sweep(model, LAYER, passages, {"x": svd_splice(1, [model.cfg.n_heads])}, progress=False)
    with pytest.raises(ValueError, match="rank"):
        svd_splice(0, [0])
