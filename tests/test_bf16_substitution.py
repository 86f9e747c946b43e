"""Results that hold in bfloat16 (issue #18): the native reference goes through the same computation as the
conditions, the comparisons run in float32 from the edited layer on, and each run reports its numerical floor."""

import copy
import functools

import numpy as np
import pytest
import torch

from sae_checks import firing_sae
from writesae_lens.evaluation import substitution
from writesae_lens.evaluation.edited_runs import EditedRuns
from writesae_lens.evaluation.firings import scan_firings
from writesae_lens.evaluation.numerical_floor import floor_summary
from writesae_lens.evaluation.records import CONDITIONS
from writesae_lens.evaluation.stats import format_summary, summarize
from writesae_lens.evaluation.substitution import replacement_test
from writesae_lens.evaluation.tail_precision import check_precision, comparison_model

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER, HEAD = 1, 2
KL_COLUMNS = [f"kl_{c}{s}" for c in CONDITIONS for s in ("", "_rev")]


@pytest.fixture(scope="module")
def model(qwen35_pair):
    return qwen35_pair[1]


@pytest.fixture(scope="module")
def bf16_model(model):
    return copy.deepcopy(model).to(torch.bfloat16)


@pytest.fixture(scope="module")
def passages():
    return torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(31))


@pytest.fixture(scope="module")
def sae(model, passages):
    return firing_sae(model, passages, LAYER, HEAD)


def _zero_edit_results(model, sae, passages, precision, reference, timing="after_read"):
    """EditedRuns results where every condition's edit is zero (each condition is the native distribution again)."""
    scan = scan_firings(model, sae, LAYER, HEAD, passages, keep_inputs=True, progress=False)
    runs = EditedRuns(model, LAYER, HEAD, timing, "next", batch_size=12, precision=precision, reference=reference)
    group = []
    for p, inputs in scan.passage_inputs.items():
        positions = sorted(set(scan.position[scan.passage == p].tolist()) - {passages.shape[1] - 1})[:6]
        zero = torch.zeros(model.cfg.d_k, model.cfg.d_v)
        group.append((p, inputs, {t: {c: zero for c in CONDITIONS} for t in positions}))
    runs.add(group)
    runs.finish()
    return runs.results


@pytest.mark.parametrize("precision", ["model", "float32"])
@pytest.mark.parametrize("timing", ["after_read", "write"])
def test_native_vs_native_floor_is_exactly_zero_through_the_same_computation(bf16_model, sae, passages, precision,
                                                                              timing):
    """In bf16, with the bf16 tail too: a condition that edits nothing is the native row again, to the last bit."""
    results = _zero_edit_results(bf16_model, sae, passages, precision, "row", timing)
    assert len(results) >= 12
    kls = np.array([[entry[c] for c in KL_COLUMNS] for entry in results.values()])
    assert (kls == 0).all()
    top1 = np.array([[entry[f"top1_{c}"] for c in ("native", *CONDITIONS)] for entry in results.values()])
    assert (top1 == top1[:, :1]).all()
    floors = np.array([entry["kl_floor"] for entry in results.values()])
    assert np.isfinite(floors).all() and (floors >= 0).all()
    if precision == "model":  # the native pass and the row path round differently in bf16: that is the floor
        assert floors.max() > 0


def test_the_earlier_reference_has_a_floor_in_bf16(bf16_model, sae, passages):
    """The check above can fail: against the native pass, nothing-edited conditions have non-zero KLs in bf16."""
    results = _zero_edit_results(bf16_model, sae, passages, "model", "pass")
    kls = np.array([[entry[c] for c in KL_COLUMNS] for entry in results.values()])
    assert kls.max() > 1e-6
    assert all(np.isnan(entry["kl_floor"]) for entry in results.values())


def _earlier_protocol(monkeypatch):
    """replacement_test as before #18: the KLs against the batched native pass, the model's own dtype."""
    monkeypatch.setattr(substitution, "EditedRuns", functools.partial(EditedRuns, reference="pass"))
    return functools.partial(replacement_test, precision="model")


@pytest.mark.parametrize("timing,kl_at", [("after_read", "next"), ("write", "next"), ("after_read", "end")])
def test_float32_records_equal_the_earlier_protocol(model, sae, passages, timing, kl_at, monkeypatch):
    """In fp32 nothing changes: the records equal the earlier protocol's to 1e-6 (the rows' fp32 rounding)."""
    kwargs = dict(max_firings_per_feature=3, max_firings=24, timing=timing, kl_at=kl_at, progress=False)
    fixed = replacement_test(model, sae, LAYER, HEAD, passages, **kwargs)
    earlier = _earlier_protocol(monkeypatch)(model, sae, LAYER, HEAD, passages, **kwargs)
    keys = ["passage", "position", "feature", "atom", "coefficient", "native_write_norm"]
    assert fixed[keys].equals(earlier[keys])
    assert (fixed[KL_COLUMNS] - earlier[KL_COLUMNS]).abs().to_numpy().max() <= 1e-6
    top1 = [c for c in fixed.columns if c.startswith("top1_")]
    assert fixed[top1].equals(earlier[top1])
    assert fixed["kl_floor"].max() < 1e-9  # fp32: the two native computations agree to rounding
    assert earlier["kl_floor"].isna().all()


def _median_log_ratios(records, reference):
    same = records.merge(reference, on=["passage", "position", "feature"], suffixes=("", "_ref"))
    same = same[same.atom == same.atom_ref]
    assert len(same) >= 0.8 * len(reference)
    return {c: float(np.median(np.abs(np.log(same[f"kl_{c}"] / same[f"kl_{c}_ref"])))) for c in CONDITIONS}


def test_bf16_records_track_float32_on_the_same_firings(model, bf16_model, sae, passages, monkeypatch):
    """bf16 against fp32 on the same firings: the fixed path within 1.25x per condition (median), the earlier one
    not (so the check can fail)."""
    kwargs = dict(max_firings_per_feature=4, max_firings=30, progress=False)
    reference = replacement_test(model, sae, LAYER, HEAD, passages, **kwargs)
    firings = reference[["passage", "position", "feature"]]
    fixed = replacement_test(bf16_model, sae, LAYER, HEAD, passages, firings=firings, progress=False)
    assert max(_median_log_ratios(fixed, reference).values()) < np.log(1.25)
    earlier = _earlier_protocol(monkeypatch)(bf16_model, sae, LAYER, HEAD, passages, firings=firings,
                                             progress=False)
    assert max(_median_log_ratios(earlier, reference).values()) > np.log(1.25)


def test_summary_reports_the_floor_and_the_records_flag_firings_below_it(bf16_model, sae, passages, tmp_path):
    records = replacement_test(bf16_model, sae, LAYER, HEAD, passages, max_firings_per_feature=3, max_firings=20,
                               precision="model", progress=False)
    floor = records["kl_floor"].max()
    smallest = records[KL_COLUMNS].min(axis=1)
    assert records["below_floor"].tolist() == (smallest <= floor).astype(int).tolist()
    summary = summarize(records, seed=0, n_cluster_resamples=200, n_permutations=200, n_atom_resamples=200)
    assert summary.floor == floor_summary(records)
    assert summary.floor.floor == floor and summary.floor.n_below == int(records["below_floor"].sum())
    assert "numerical floor" in format_summary(summary)
    from writesae_lens.evaluation.records import load_records, save_records

    path = save_records(records, tmp_path / "records.csv")
    assert floor_summary(load_records(path)) == summary.floor  # the floor survives saving


def test_given_firings_reproduce_the_sampled_records(model, sae, passages):
    sampled = replacement_test(model, sae, LAYER, HEAD, passages, max_firings_per_feature=2, max_firings=12,
                               progress=False)
    given = replacement_test(model, sae, LAYER, HEAD, passages, firings=sampled[["passage", "position", "feature"]],
                             progress=False)
    assert given.equals(sampled)
    with pytest.raises(ValueError, match="outside the passages"):
        replacement_test(model, sae, LAYER, HEAD, passages, firings=[(0, passages.shape[1] - 1, 0)], progress=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("float16")


def test_comparison_model_leaves_the_model_alone(model, bf16_model):
    assert comparison_model(model, LAYER) is model  # fp32: used as it is
    assert comparison_model(bf16_model, LAYER, "model") is bf16_model
    before = {name: (p.dtype, p.data_ptr()) for name, p in bf16_model.named_parameters()}
    tail = comparison_model(bf16_model, LAYER)
    assert {name: (p.dtype, p.data_ptr()) for name, p in bf16_model.named_parameters()} == before
    assert all(p.dtype == torch.float32 for m in [*tail.blocks[LAYER:], tail.ln_final, tail.unembed]
               for p in m.parameters())
    assert all(a is b for a, b in zip(tail.blocks[:LAYER], bf16_model.blocks[:LAYER]))  # shared, not copied
    assert tail.embed is bf16_model.embed
    assert torch.equal(tail.unembed.W_U, bf16_model.unembed.W_U.float())
