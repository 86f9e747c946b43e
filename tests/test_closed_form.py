"""The closed-form logit-shift audit: the gain identity, the measured and first-order shifts against independent
references on all three families (float64 models), the statistics against numpy / scipy / scikit-learn, the audit's
records against their own formulas, the command line and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as scipy_stats
from sklearn.metrics import r2_score

from rwkv7_factory import random_rwkv7
from sae_checks import firing_sae
from writesae_lens import interventions as iv
from writesae_lens.evaluation.closed_form import logit_shift_audit
from writesae_lens.evaluation.closed_form_summary import (cell_r_squared, selectivity_summary,
                                                          sign_prediction_summary, summarize_audit)
from writesae_lens.evaluation.logit_shift import (decay_gain, fitted_scale, head_output_matrix, out_path_logits,
                                                  r_squared, r_squared_fitted, top_k_overlap)
from writesae_lens.evaluation.state_perturbation import StatePerturbations
from writesae_lens.evaluation.stats import wilson_interval
from writesae_lens.generation.directions import value_directions

# ---- pure formulas ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("horizon", [0, 1, 5])
def test_gain_is_the_naive_propagation_without_the_erase_term(horizon):
    generator = torch.Generator().manual_seed(horizon)
    delta = torch.randn(5, 7, dtype=torch.float64, generator=generator)  # d_k != d_v
    log_decay = -torch.rand(horizon, dtype=torch.float64, generator=generator) * 2
    per_channel = -torch.rand(horizon, 5, dtype=torch.float64, generator=generator) * 2
    state, state_channel = delta.clone(), delta.clone()
    for s in range(horizon):  # S_s = a_s (I - beta k k^T) S_{s-1} with the erase term dropped; RWKV-7: diag(w_s)
        state = log_decay[s].exp() * state
        state_channel = per_channel[s].exp()[:, None] * state_channel
    assert torch.allclose(decay_gain(log_decay) * delta, state, rtol=1e-14, atol=0)
    assert torch.allclose(decay_gain(per_channel, channel_axis=True)[:, None] * delta, state_channel, rtol=1e-14)
    if horizon == 0:
        assert float(decay_gain(log_decay)) == 1.0


def test_r_squared_and_fitted_scale_match_numpy_scipy_sklearn():
    rng = np.random.default_rng(0)
    predicted = rng.normal(size=(6, 40))
    measured = 0.7 * predicted + 0.3 + rng.normal(scale=0.4, size=(6, 40))
    for row in range(6):
        assert r_squared(measured[row], predicted[row]) == pytest.approx(r2_score(measured[row], predicted[row]))
        assert r_squared_fitted(measured[row], predicted[row]) == pytest.approx(
            scipy_stats.pearsonr(predicted[row], measured[row]).statistic ** 2)
        scale = np.linalg.lstsq(predicted[row][:, None], measured[row], rcond=None)[0][0]
        assert fitted_scale(measured[row], predicted[row]) == pytest.approx(scale)
    assert np.allclose(r_squared(measured, predicted), [r2_score(m, p) for m, p in zip(measured, predicted)])
    assert np.isnan(r_squared(np.ones(5), np.arange(5.0)))  # no variance: undefined, not 1


def test_wilson_bound_and_summaries_match_scipy():
    for flips, n in ((0, 10000), (3, 10000), (40, 500)):
        interval = scipy_stats.binomtest(flips, n).proportion_ci(method="wilson")
        low, high = wilson_interval(flips, n, z=scipy_stats.norm.ppf(0.975))  # the project uses z = 1.96 exactly
        assert (low, high) == pytest.approx((interval.low, interval.high), abs=1e-12)
    rng = np.random.default_rng(1)
    predicted = rng.normal(size=300)
    trials = pd.DataFrame(dict(predicted=predicted, measured=2 * predicted + rng.normal(size=300)))
    got = sign_prediction_summary(trials)
    reference = scipy_stats.pearsonr(trials.predicted, trials.measured)
    assert got["pearson_r"] == pytest.approx(reference.statistic) and got["pearson_p"] == pytest.approx(reference.pvalue)
    agree = int((np.sign(trials.measured) == np.sign(trials.predicted)).sum())
    assert got["agreement"] == agree / 300
    assert got["pooled_r2"] == pytest.approx(r2_score(trials.measured, trials.predicted))
    values = rng.uniform(0.8, 1.0, size=50)
    table = selectivity_summary(pd.DataFrame(dict(control="random", k=5, selectivity=values)))
    low, high = scipy_stats.t.interval(0.95, 49, loc=values.mean(), scale=scipy_stats.sem(values))
    assert table.loc[0, "low"] == pytest.approx(low) and table.loc[0, "high"] == pytest.approx(high)


def test_top_k_overlap_counts_shared_tokens():
    a = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    b = torch.tensor([[1.0, 4.0, 5.0, 2.0, 3.0]])  # top-2 {2, 1} vs {0, 1}
    assert float(top_k_overlap(a, b, 2)) == 0.5
    assert float(top_k_overlap(a, a, 3)) == 1.0


def test_token_direction_is_the_unit_out_path_gradient():
    generator = torch.Generator().manual_seed(2)
    w_o, w_u = torch.randn(10, 6, generator=generator), torch.randn(10, 30, generator=generator)
    direction = value_directions(w_o, w_u[:, 7:8])[0][0]
    assert float(direction.norm()) == pytest.approx(1.0)
    # it maximises <W_O q, W_U[:, 7]> over unit q
    others = torch.nn.functional.normalize(torch.randn(200, 6, generator=generator), dim=-1)
    best = out_path_logits(w_o, w_u, direction)[7]
    assert bool((out_path_logits(w_o, w_u, others)[:, 7] <= best + 1e-6).all())


# ---- the engine on every family (float64) -----------------------------------------------------------------------------

def _family(name, qwen35_folders, mamba2_folders):
    from writesae_lens.adapters import HookedMamba2, HookedQwen35

    if name == "qwen35":
        return HookedQwen35.from_pretrained(qwen35_folders["gqa_nonsquare"], dtype=torch.float64).eval(), 1, 3
    if name == "mamba2":
        return HookedMamba2.from_pretrained(mamba2_folders["grouped_nonsquare"], dtype=torch.float64).eval(), 1, 5
    return random_rwkv7(101, seed=3).to(torch.float64).eval(), 1, 2


FAMILIES = ["qwen35", "mamba2", "rwkv7"]


@pytest.mark.parametrize("family", FAMILIES)
def test_measured_shift_equals_the_hook_path_and_first_order_the_central_difference(family, qwen35_folders,
                                                                                    mamba2_folders):
    torch.set_num_threads(1)
    model, layer, head = _family(family, qwen35_folders, mamba2_folders)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (3, 14), generator=generator)
    horizons = [0, 1, 3, 13]  # 13 = the whole prompt: t0 = 0
    engine = StatePerturbations(model, layer, head, tokens, horizons, passage_batch_size=2)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    assert d_k != d_v
    checked = 0
    for group in engine.groups():
        rows = torch.arange(len(group.prompts)).repeat(3)  # each prompt three times, other perturbations
        n = len(rows)
        # rank-1 perturbations of several sizes (the paper's eps * p q^T)
        p = torch.randn(n, d_k, generator=generator, dtype=torch.float64)
        q = torch.randn(n, d_v, generator=generator, dtype=torch.float64)
        eps = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64).repeat_interleave(len(group.prompts))
        matrices = eps[:, None, None] * p[:, :, None] * q[:, None, :] / d_k
        for h in horizons:
            t0 = engine.t - h
            shift = engine.logits(group, h, rows, matrices) - engine.logits(group, h, rows, torch.zeros_like(matrices))
            prompts = tokens[torch.tensor(group.prompts)[rows]]
            with torch.no_grad():
                edited = model.run_with_hooks(prompts, fwd_hooks=iv.add_to_state(
                    layer, [(i, t0, head) for i in range(n)], matrices.float(), timing="write"))[:, -1]
                reference = edited - model(prompts)[:, -1]
            # the hook path takes fp32 matrices: compare against the same rounded perturbations
            shift_rounded = engine.logits(group, h, rows, matrices.float().double()) - engine.logits(
                group, h, rows, torch.zeros_like(matrices))
            assert torch.allclose(shift_rounded, reference, atol=1e-9, rtol=0), (h, (shift_rounded - reference).abs().max())
            assert float(shift.abs().max()) > 1e-4  # the perturbation does something
            # first order: JVP against a central difference of the measured shift
            _, tangent = engine.first_order(group, h, rows, matrices)
            e = 1e-6  # float64: rounding ~1e-16 / e, truncation ~e^2
            central = (engine.logits(group, h, rows, e * matrices) - engine.logits(group, h, rows, -e * matrices)) / (2 * e)
            scale = float(tangent.abs().max())
            assert float((tangent - central).abs().max()) <= 1e-6 * scale + 1e-8, (h, float((tangent - central).abs().max()))
            checked += n
    assert checked >= 3 * 3 * len(horizons)


# ---- the audit ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def audited(qwen35_folders):
    from writesae_lens.adapters import HookedQwen35

    torch.set_num_threads(1)
    model = HookedQwen35.from_pretrained(qwen35_folders["gqa_nonsquare"], dtype=torch.float64).eval()
    tokens = torch.randint(0, 100, (10, 12), generator=torch.Generator().manual_seed(5))
    sae = firing_sae(model, tokens, 1, 2, d_sae=24, k=4).double()
    result = logit_shift_audit(model, sae, 1, 2, tokens, n_atoms=4, eps=(0.001, 1.0), horizons=(0, 2, 5),
                               n_eval_tokens=6, n_sign_trials=30, batch_size=16, passage_batch_size=4,
                               progress=False)
    return model, sae, tokens, result


def test_audit_records_follow_their_formulas(audited):
    model, sae, tokens, result = audited
    records = result.records
    assert len(records) == 10 * 3 * 4 * 2 * 6
    assert (records.loc[records.horizon == 0, "gain"] == 1.0).all()
    # predicted = eps * G * <p, q_t> * <W_O q, W_U[tok]>, rebuilt here from the hooks and the SAE
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in (
        "blocks.1.mixer.hook_read_q", "blocks.1.mixer.hook_decay"))
    q_t = cache["blocks.1.mixer.hook_read_q"][:, -1, 2]
    decay = cache["blocks.1.mixer.hook_decay"][:, :, 2]
    w_o = head_output_matrix(model.blocks[1].mixer, 2)
    sample = records.sample(60, random_state=0)
    for row in sample.itertuples():
        t = tokens.shape[1] - 1
        gain = float(decay[row.prompt, t - row.horizon + 1 : t + 1].sum().exp())
        p, q = sae.W_dec_key[row.atom, 0].detach(), sae.W_dec_value[row.atom, 0].detach()
        out = float((w_o @ q) @ model.W_U[:, row.token])
        expected = row.eps * gain * float(p @ q_t[row.prompt]) * out
        assert row.predicted == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert row.gain == pytest.approx(gain, rel=1e-6)
    # the first-order shift is linear in eps
    wide = records.pivot_table(index=["prompt", "atom", "horizon", "eval_rank"], columns="eps", values="first_order")
    small, large = wide.columns.sort_values()
    assert np.allclose(wide[large], 1000 * wide[small], rtol=1e-5, atol=1e-7)
    # measured shifts equal the hook path (spot check)
    atoms = iv.atom_matrices(sae, torch.arange(sae.cfg.d_sae), sae.cfg.d_sae)
    for row in sample.head(8).itertuples():
        t0 = tokens.shape[1] - 1 - row.horizon
        with torch.no_grad():
            edited = model.run_with_hooks(tokens[[row.prompt]], fwd_hooks=iv.add_to_state(
                1, [(0, t0, 2)], row.eps * atoms[row.atom], timing="write"))[0, -1, row.token]
            native = model(tokens[[row.prompt]])[0, -1, row.token]
        assert row.measured == pytest.approx(float(edited - native), abs=1e-5)


def test_audit_summary_and_tables(audited):
    _, _, _, result = audited
    summary = summarize_audit(result.records, result.sign_trials, result.selectivity)
    assert set(summary.headline.predictor) == {"free", "fit", "first_order"}
    assert len(summary.cells) == 3 * 4 * 2 * 6
    atom, eps = result.atoms[0], result.records.eps.min()
    one = result.records.query("horizon == 2 and atom == @atom and eps == @eps and eval_rank == 1")
    cell = summary.cells.query("horizon == 2 and atom == @atom and eps == @eps and eval_rank == 1")
    assert float(cell.r2_free.iloc[0]) == pytest.approx(r2_score(one.measured, one.predicted), rel=1e-4)
    # small eps: the first-order shift predicts the measured one
    small = summary.cells[summary.cells.eps == eps]
    assert float(small.r2_first_order.median()) > 0.999
    assert len(result.sign_trials) == 30 and set(result.selectivity.control) == {"random", "orthogonal"}
    assert ((result.selectivity.overlap >= 0) & (result.selectivity.overlap <= 1)).all()


def test_cell_r_squared_refuses_a_partial_table(audited):
    _, _, _, result = audited
    with pytest.raises(ValueError, match="every prompt"):
        cell_r_squared(result.records.iloc[:-1])


@pytest.mark.parametrize("change,message", [
    (dict(atoms=[999]), "out of range"),
    (dict(eps=(0.1, 0.0)), "finite and > 0"),
    (dict(eps=(float("nan"),)), "finite and > 0"),
    (dict(horizons=(12,)), "past the prompt"),
    (dict(horizons=(-1,)), ">= 0"),
    (dict(n_eval_tokens=0), "positive integer"),
])
def test_bad_arguments_are_refused(audited, change, message):
    model, sae, tokens, _ = audited
    kwargs = dict(n_atoms=2, eps=(0.1,), horizons=(0,), n_eval_tokens=2, n_sign_trials=0, selectivity=False,
                  first_order=False, progress=False)
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        logit_shift_audit(model, sae, 1, 2, tokens, **kwargs)


def test_dead_atoms_and_wrong_cells_are_refused(audited):
    import copy

    model, sae, tokens, _ = audited
    base = dict(eps=(0.1,), horizons=(0,), n_eval_tokens=2, n_sign_trials=0, selectivity=False, progress=False)
    silenced = copy.deepcopy(sae)
    with torch.no_grad():
        silenced.b_enc[5] = -1e9  # atom 5 can never be among the active ones
    with pytest.raises(ValueError, match=r"atoms \[5\] are dead"):
        logit_shift_audit(model, silenced, 1, 2, tokens, atoms=[5], **base)
    with pytest.raises(ValueError, match="not a recurrent layer"):
        logit_shift_audit(model, sae, 3, 2, tokens, **base)  # layer 3 is full attention
    other = firing_sae(model, tokens, 1, 2, d_sae=8, k=2)
    other.cfg.metadata.hook_name = "blocks.1.mixer.hook_state"
    other.cfg.metadata.hook_head_index = 0
    with pytest.raises(ValueError, match="head 0"):
        logit_shift_audit(model, other, 1, 2, tokens, **base)
    other.cfg.metadata.hook_head_index = 2
    other.cfg.metadata.hook_name = "blocks.2.mixer.hook_state"  # another layer
    with pytest.raises(ValueError, match="blocks.2.mixer.hook_state"):
        logit_shift_audit(model, other, 1, 2, tokens, **base)
    other.cfg.metadata.hook_name = "blocks.1.mixer.hook_state"
    other.cfg.metadata.model_name = "some-other-model"
    with pytest.raises(ValueError, match="some-other-model"):
        logit_shift_audit(model, other, 1, 2, tokens, **base)
    # the explicit override accepts it (same shape)
    result = logit_shift_audit(model, other, 1, 2, tokens, ignore_sae_metadata=True, n_atoms=1, **base)
    assert len(result.records) > 0
    rwkv = random_rwkv7(101, seed=1)  # another model with another state shape: never accepted
    with pytest.raises(ValueError, match="d_k, d_v"):
        logit_shift_audit(rwkv, other, 1, 2, tokens, ignore_sae_metadata=True, **base)


def test_closed_form_command_writes_records_summary_and_plots(tmp_path, capsys):
    import writesae_lens.saes as ws
    from writesae_lens.cli import main
    from writesae_lens.models import load_hooked_model

    torch.set_num_threads(1)
    model = load_hooked_model("qwen35-tiny")
    tokens = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    sae = firing_sae(model, tokens, 1, 0, d_sae=16, k=3)
    sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index = "blocks.1.mixer.hook_state", 0
    sae.save_model(tmp_path / "sae")
    assert isinstance(ws.WriteTopKSAE, type)
    out = tmp_path / "audit"
    code = main(["closed-form", "--model", "qwen35-tiny", "--sae", str(tmp_path / "sae"), "--layer", "1", "--head",
                 "0", "--prompts", "6", "--prompt-len", "20", "--atoms", "3", "--horizons", "0", "4",
                 "--eval-tokens", "5", "--sign-trials", "20", "--out", str(out)])
    assert code == 0
    for name in ("records.parquet", "cells.csv", "sign_trials.csv", "selectivity.csv", "summary.txt", "summary.json",
                 "measured_vs_predicted.png", "r2_by_rank.png", "r2_by_horizon.png"):
        assert (out / name).stat().st_size > 0, name
    records = pd.read_parquet(out / "records.parquet")
    assert len(records) == 6 * 3 * 4 * 2 * 5
    assert "Closed-form logit shift" in capsys.readouterr().out
    code = main(["closed-form", "--model", "qwen35-tiny", "--sae", str(tmp_path / "sae"), "--layer", "1", "--head",
                 "0", "--prompts", "6", "--prompt-len", "20", "--horizons", "25", "--out", str(tmp_path / "bad")])
    assert code == 2 and "past the prompt" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
