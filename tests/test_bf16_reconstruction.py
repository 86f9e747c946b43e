"""Reconstruction in the cache and passage bits/token in bfloat16 (issue #18): the native reference is a row through
the same computation as the conditions (an identity splice / a passage without edits gives exactly the native loss),
the layers from the edited one on run in float32 (``precision="float32"``), and each run reports its floor; in float32
nothing changes (the straightforward protocol of tests/reconstruction_reference.py, the hook path)."""

import copy

import numpy as np
import pytest
import torch

from family_models import family_model
from reconstruction_reference import straightforward
from sae_checks import firing_sae
from test_generation import recurrent_layers
from writesae_lens.evaluation.cache_reconstruction import (
    identity_splice,
    reconstruction_sweep,
    reconstruction_table,
    sae_splice,
    svd_splice,
)
from writesae_lens.evaluation.passage_bits import passage_bits_per_token, summarize_bits

LAYER, HEAD, PREFIX = 1, 2, 17

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen35", "mamba2", "rwkv7"])
def family(request, qwen35_pair, mamba2_pair):
    """(float32 model, the same weights in bfloat16, passages [3, 40])."""
    model = family_model(request.param, qwen35_pair, mamba2_pair)
    passages = torch.randint(0, 90, (3, 40), generator=torch.Generator().manual_seed(5))
    return model, copy.deepcopy(model).to(torch.bfloat16), passages


def _conditions(model, passages):
    heads = list(range(model.cfg.n_heads))
    return {"identity": identity_splice(heads), "one_head": sae_splice({HEAD: firing_sae(model, passages, LAYER, HEAD)}),
            "rank_1": svd_splice(1, [HEAD]), "rank_1_all": svd_splice(1, heads)}


def _by(table):
    return table.pivot(index="passage", columns="condition", values="nll")


def test_float32_sweep_is_unchanged(family):
    """A float32 model: the losses equal the straightforward protocol's to 1e-6 (as before #18), the floor is below
    1e-6, and precision="model" is the same computation."""
    model, _, passages = family
    conditions = _conditions(model, passages)
    table = reconstruction_sweep(model, LAYER, passages, conditions, prefix_len=PREFIX, progress=False)
    reference = straightforward(model, LAYER, passages, conditions, PREFIX)
    worst = max(abs(r.nll - reference[(r.passage, r.condition)]) for r in table.itertuples())
    assert worst < 1e-6, worst
    assert table.floor.max() < 1e-6 and (table.floor >= 0).all()
    same = reconstruction_sweep(model, LAYER, passages, conditions, prefix_len=PREFIX, precision="model",
                                progress=False)
    assert same.equals(table)


def test_bfloat16_identity_splice_is_exactly_native(family):
    _, bf16, passages = family
    before = {name: p.clone() for name, p in bf16.state_dict().items()}
    table = reconstruction_sweep(bf16, LAYER, passages, _conditions(bf16, passages), prefix_len=PREFIX,
                                 row_batch_size=7, progress=False)
    by = _by(table)
    assert (by["identity"] == by["native"]).all()  # the floor through the same computation: exactly 0
    assert np.isfinite(table.nll).all() and (by["rank_1"] != by["native"]).any()
    floors = table.groupby("passage").floor.agg(["min", "max"])
    assert (floors["min"] == floors["max"]).all() and np.isfinite(floors["max"]).all()  # one floor per passage
    summary = reconstruction_table(table).set_index("condition")
    assert summary.loc["native", "below_floor"] == 0 and summary.loc["identity", "below_floor"] == 1
    assert (summary.floor == table.floor.max()).all()
    assert all(torch.equal(before[name], p) for name, p in bf16.state_dict().items())  # the model is unchanged


def test_bfloat16_splice_effect_is_resolved(family):
    """The change of the suffix loss a splice makes: the bf16 model with the float32 tail agrees with the same
    (bf16-rounded) weights run in float32 far better than the bf16 model in its own dtype; at the first recurrent
    layer, so that the two share everything before it (only the embedding)."""
    _, bf16, passages = family
    layer = recurrent_layers(bf16)[0]
    fp32 = copy.deepcopy(bf16).float()
    conditions = {"rank_1": svd_splice(1, [HEAD]), "rank_1_all": svd_splice(1, list(range(bf16.cfg.n_heads)))}

    def deltas(model, precision):
        by = _by(reconstruction_sweep(model, layer, passages, conditions, prefix_len=PREFIX, precision=precision,
                                      progress=False))
        return by[list(conditions)].to_numpy() - by[["native"]].to_numpy()

    exact = deltas(fp32, "float32")
    fixed = np.abs(deltas(bf16, "float32") - exact).max()
    rounded = np.abs(deltas(bf16, "model") - exact).max()
    print(f"splice, largest |delta - float32 delta|: float32 tail {fixed:.3g}, bf16 {rounded:.3g}")
    assert fixed * 4 < rounded, (fixed, rounded)


def test_float32_passage_bits_unchanged_and_floor(family):
    model, _, passages = family
    sae = firing_sae(model, passages, LAYER, HEAD, d_sae=16, k=3)
    table = passage_bits_per_token(model, sae, LAYER, HEAD, passages, [0, 3, 5, 9], seed=4, progress=False)
    same = passage_bits_per_token(model, sae, LAYER, HEAD, passages, [0, 3, 5, 9], seed=4, precision="model",
                                  progress=False)
    assert same.equals(table)
    with torch.no_grad():
        native = model(passages, return_type="loss", loss_per_token=True).double().mean(-1).numpy() / np.log(2)
    np.testing.assert_allclose(table.bits_native, native, atol=1e-6)
    assert (table.floor < 1e-6).all()
    summary = summarize_bits(table)
    assert summary["floor"] == table.floor.max()
    smallest = np.minimum(table.delta_delete.abs(), table.delta_random.abs())
    assert summary["below_floor"] == int(((table.edits > 0) & (smallest <= summary["floor"])).sum())


def test_bfloat16_passage_bits(family):
    """Nothing edited: deltas exactly 0 in bf16. The deltas of delete / random at the first recurrent layer (nothing
    before it but the embedding: the bf16 model with the float32 tail and the same bf16-rounded weights in float32
    compute the same thing) agree with the float32 run far better than the bf16 model in its own dtype."""
    model, bf16, passages = family
    layer = recurrent_layers(bf16)[0]
    sae = firing_sae(model, passages, layer, HEAD, d_sae=16, k=3)
    quiet = passage_bits_per_token(bf16, sae, layer, HEAD, passages, [], progress=False)  # nothing edited
    assert (quiet.edits == 0).all() and (quiet.delta_delete == 0).all() and (quiet.delta_random == 0).all()
    assert np.isfinite(quiet.floor).all()
    registers = [0, 3, 5, 9]
    fp32 = copy.deepcopy(bf16).float()
    exact = passage_bits_per_token(fp32, sae, layer, HEAD, passages, registers, seed=4, progress=False)
    fixed = passage_bits_per_token(bf16, sae, layer, HEAD, passages, registers, seed=4, progress=False)
    rounded = passage_bits_per_token(bf16, sae, layer, HEAD, passages, registers, seed=4, precision="model",
                                     progress=False)
    same = (fixed.edits == exact.edits).to_numpy()  # the firings are those of the bf16 states
    assert same.sum() >= 2 and (fixed.edits > 0).any()
    columns = ["delta_delete", "delta_random"]
    error_fixed = np.abs(fixed[columns].to_numpy() - exact[columns].to_numpy())[same].max()
    error_rounded = np.abs(rounded[columns].to_numpy() - exact[columns].to_numpy())[same].max()
    print(f"passage bits, largest |delta - float32 delta|: float32 tail {error_fixed:.3g}, bf16 {error_rounded:.3g}")
    assert error_fixed * 4 < error_rounded, (error_fixed, error_rounded)
    assert "floor" in summarize_bits(fixed)
