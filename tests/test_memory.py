"""The memory report (writesae_lens/evaluation/memory.py): pure functions against numpy/scipy, the memory length and
decay against a Mamba-2 whose decays are set by hand (known answer, non-square heads), the propagated contributions
against a token-by-token reference for Gated DeltaNet (GQA, non-square) and RWKV-7 (per-channel decay, non-square),
the logit effects against the same edits made through another hook, the demo-cell choice and the command."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from writesae_lens.evaluation.memory import (MemoryReport, MemorySettings, choose_demo_cell, first_lag_below,
                                             format_memory_report, mean_kl, memory_report, retention_quantiles,
                                             write_contributions, write_norms)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ pure functions


def test_first_lag_below_counts_from_one_and_censors():
    contributions = torch.tensor([[0.5, 0.09, 0.5], [0.2, 0.15, 0.11], [0.05, 0.01, 0.0], [0.5, float("nan"), 0.0]])
    lengths = first_lag_below(contributions, 0.1)
    assert lengths[:3].tolist() == [2.0, 4.0, 1.0]  # 4 = max_lag + 1: never below within the lags followed
    assert math.isnan(lengths[3])


def test_write_norms_is_the_frobenius_norm_of_the_write():
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 3, 4, generator=gen), torch.randn(5, 3, 7, generator=gen)
    beta = torch.randn(5, 3, generator=gen)
    matrices = beta[..., None, None] * k[..., :, None] * v[..., None, :]  # [5, 3, 4, 7]
    torch.testing.assert_close(write_norms(k, v, beta), matrices.double().flatten(-2).norm(dim=-1))


def test_mean_kl_matches_scipy_entropy():
    gen = torch.Generator().manual_seed(1)
    base, edited = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    p, q = torch.softmax(base.double(), -1).numpy(), torch.softmax(edited.double(), -1).numpy()
    expected = stats.entropy(p, q, axis=-1).mean(-1)
    np.testing.assert_allclose(mean_kl(base, edited).numpy(), expected, rtol=1e-10)


def test_retention_quantiles_match_numpy():
    log_decay = -torch.rand(3, 50, 4, generator=torch.Generator().manual_seed(2)) * 3
    expected = np.quantile(np.exp(log_decay.double().numpy()).ravel(), [0.1, 0.5, 0.9])
    np.testing.assert_allclose(retention_quantiles(log_decay, (0.1, 0.5, 0.9)), expected, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ known answer

# Per-token retention set by hand for the 8 heads of the grouped non-square Mamba-2 (d_k = d_state = 8, d_v = 12).
HAND_DECAYS = [1e-6, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]


def hand_decay_mamba2(folder):
    """The Mamba-2 of ``folder`` with the time step fixed (dt rows of in_proj zero, softplus(dt_bias) = 0.5) and
    A_log set so that every token of head h keeps exactly HAND_DECAYS[h] of the state: exp(-0.5 exp(A_log))."""
    from writesae_lens.adapters.mamba2 import HookedMamba2

    model = HookedMamba2.from_pretrained(folder).eval()
    dt = torch.tensor(0.5)
    with torch.no_grad():
        for block in model.blocks:
            mixer = block.mixer
            n = model.cfg.n_heads
            mixer.in_proj.weight[-n:] = 0.0
            if mixer.in_proj.bias is not None:
                mixer.in_proj.bias[-n:] = 0.0
            mixer.dt_bias.fill_(float(dt + torch.log(-torch.expm1(-dt))))  # softplus(dt_bias) = 0.5
            rates = -torch.log(torch.tensor(HAND_DECAYS, dtype=torch.float64)) / 0.5
            mixer.A_log.copy_(rates.log().float())
    return model


def largest(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def random_tokens(model, n: int, n_pos: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (n, n_pos), generator=torch.Generator().manual_seed(seed))


def test_known_decays_give_known_memory_lengths(mamba2_folders):
    model = hand_decay_mamba2(mamba2_folders["grouped_nonsquare"])
    assert model.cfg.d_k != model.cfg.d_v
    settings = MemorySettings(first_position=4, max_lag=40, sources_per_passage=2, threshold=0.1, batch_size=8)
    tokens = random_tokens(model, 2, 50)
    report = memory_report(model, tokens, settings, layers=[1], progress=False)
    table = report.table.set_index("head")
    expected_length = [min(math.ceil(math.log(0.1) / math.log(a)), settings.max_lag + 1) for a in HAND_DECAYS]
    assert table["memory_length"].tolist() == expected_length  # [1, 2, 4, 7, 11, 22, 41, 41]
    assert table["memory_censored"].tolist() == [float(n > settings.max_lag) for n in expected_length]
    for column in ("decay_q10", "decay_q50", "decay_q90"):
        np.testing.assert_allclose(table[column], HAND_DECAYS, rtol=1e-5)
    # A scalar decay: the write's contribution at lag j is exactly a^j, for every source.
    contributions, sources = write_contributions(model, tokens, 1, settings)
    assert contributions.shape == (8, len(sources), settings.max_lag)
    lags = torch.arange(1, settings.max_lag + 1, dtype=torch.float64)
    for head, a in enumerate(HAND_DECAYS):
        expected = torch.tensor(a, dtype=torch.float64) ** lags  # [max_lag]
        got = contributions[head]  # [n_sources, max_lag]
        big = expected > 1e-6
        torch.testing.assert_close(got[:, big], expected[big].expand(len(sources), -1), rtol=2e-4, atol=0)
        assert largest(got[:, ~big]) < 1e-5
    # The head that keeps almost nothing holds only the current write.
    assert table.loc[0, "write_share"] == pytest.approx(1.0, abs=1e-3)
    curves = report.curves[(report.curves["layer"] == 1) & (report.curves["head"] == 5)]
    np.testing.assert_allclose(curves["contribution"][:10], 0.9 ** np.arange(1, 11), rtol=2e-4)


# ------------------------------------------------------------------------------------------------ reference recurrences


def naive_contributions(transition, writes, pairs, max_lag):
    """``||T_{s+j} .. T_{s+1} W_s|| / ||W_s||`` per head with explicit float64 matrices: [head, n_pairs, max_lag]."""
    n_heads = writes.shape[2]
    out = torch.zeros(n_heads, len(pairs), max_lag, dtype=torch.float64)
    for i, (b, s) in enumerate(pairs):
        for h in range(n_heads):
            state = writes[b, s, h]
            for j in range(1, max_lag + 1):
                state = transition(b, s + j, h) @ state
                out[h, i, j - 1] = state.norm() / writes[b, s, h].norm()
    return out


def native_factors(model, tokens, layer, names):
    _, cache = model.run_with_cache(tokens, names_filter=[f"blocks.{layer}.mixer.{n}" for n in names])
    return [cache[f"blocks.{layer}.mixer.{n}"].double() for n in names]


def compare_with_reference(model, tokens, layer, settings, transition_from_factors, names):
    factors = native_factors(model, tokens, layer, ["hook_write_k", "hook_write_v", "hook_write_beta", *names])
    k, v, beta = factors[:3]
    writes = beta[..., None, None] * k[..., :, None] * v[..., None, :]  # [b, p, h, d_k, d_v]
    got, pairs = write_contributions(model, tokens, layer, settings)
    expected = naive_contributions(transition_from_factors(k, beta, *factors[3:]), writes, pairs, settings.max_lag)
    big = expected > 1e-5
    assert big.float().mean() > 0.3  # the comparison covers many lags
    torch.testing.assert_close(got[big], expected[big], rtol=1e-4, atol=0)
    assert largest(got[~big] - expected[~big]) < 1e-6


SMALL = MemorySettings(first_position=2, max_lag=10, sources_per_passage=2, batch_size=4)


def test_gated_deltanet_contributions_follow_the_delta_rule(qwen35_pair):
    model = qwen35_pair[1]
    assert model.cfg.d_k != model.cfg.d_v
    layer = model.cfg.recurrent_layers[0]

    def transition(k, beta, g):
        eye = torch.eye(k.shape[-1], dtype=torch.float64)
        return lambda b, t, h: torch.exp(g[b, t, h]) * (eye - beta[b, t, h] * torch.outer(k[b, t, h], k[b, t, h]))

    compare_with_reference(model, random_tokens(model, 2, 20), layer, SMALL, transition, ["hook_decay"])


def test_rwkv7_contributions_follow_the_per_channel_decay_and_erase():
    from rwkv7_factory import random_rwkv7

    model = random_rwkv7(97)
    assert model.cfg.d_k != model.cfg.d_v

    def transition(k, beta, w, ea, eb):
        return lambda b, t, h: torch.diag(torch.exp(w[b, t, h])) - torch.outer(ea[b, t, h], eb[b, t, h])

    compare_with_reference(model, random_tokens(model, 2, 20), 1, SMALL, transition,
                           ["hook_decay", "hook_erase_a", "hook_erase_b"])


# ------------------------------------------------------------------------------------------------ logit effects


def test_logit_effects_equal_the_same_edits_made_on_the_read(qwen35_pair):
    """Zeroing a head's state at every read is a zero read; cutting it to the current write makes the read
    beta (k . q) v. Both are made here through hook_read instead, and the KL computed with scipy."""
    model = qwen35_pair[1]
    layer, head = model.cfg.recurrent_layers[-1], 2
    settings = MemorySettings(first_position=3, max_lag=4, sources_per_passage=1, batch_size=4)
    tokens = random_tokens(model, 3, 12, seed=3)
    row = memory_report(model, tokens, settings, layers=[layer], progress=False).table.set_index("head").loc[head]
    q, k, v, beta = native_factors(model, tokens, layer, ["hook_read_q", "hook_write_k", "hook_write_v",
                                                          "hook_write_beta"])
    only_write = (beta[..., None] * (k * q).sum(-1, keepdim=True) * v)[:, :, head]  # [b, p, d_v]
    with torch.no_grad():
        base = torch.softmax(model(tokens).double(), -1)[:, 3:].numpy()
        for column, new_read in (("kl_zero", torch.zeros_like(only_write)), ("kl_memory", only_write)):
            def edit(read, hook, new_read=new_read):
                read = read.clone()
                read[:, :, head] = new_read.to(read.dtype)
                return read

            logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.mixer.hook_read", edit)])
            edited = torch.softmax(logits.double(), -1)[:, 3:].numpy()
            expected = stats.entropy(base, edited, axis=-1).mean()
            assert row[column] == pytest.approx(expected, rel=1e-4), column
            assert expected > 1e-4  # the edit matters, so the comparison can fail


# ------------------------------------------------------------------------------------------------ choice, bad input


def synthetic_report():
    table = pd.DataFrame({
        "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
        "decay_q10": [0.1] * 4, "decay_q50": [0.5, 0.9, 0.95, 0.99], "decay_q90": [0.9] * 4,
        "write_share": [0.9, 0.3, 0.2, 0.05], "memory_length": [2.0, 20.0, 40.0, 129.0],
        "memory_censored": [0.0, 0.0, 0.0, 1.0], "kl_zero": [0.1] * 4, "kl_memory": [0.05, 0.02, 0.03, 0.001],
    })
    return MemoryReport(table, pd.DataFrame(columns=["layer", "head", "lag", "contribution"]),
                        MemorySettings().__dict__ | {"n_passages": 1, "n_pos": 200})


def test_choose_demo_cell_prefers_long_memory_that_moves_the_logits():
    report = synthetic_report()
    layer, head, reason = choose_demo_cell(report=report)
    # (1, 1) lasts longest but its memory barely moves the logits; (1, 0) is the longest of the others.
    assert (layer, head) == (1, 0)
    assert "layer 1 head 0" in reason and "40 tokens" in reason
    assert choose_demo_cell(report=report, density=lambda l, h: 0.0 if (l, h) == (1, 0) else 0.1)[:2] == (0, 1)
    assert len(format_memory_report(report).splitlines()) == 2 + len(report.table)
    with pytest.raises(ValueError, match="no head"):
        choose_demo_cell(report=report, density=lambda l, h: 0.0)
    with pytest.raises(ValueError, match="needs a memory report"):
        choose_demo_cell()


def test_choose_demo_cell_leaves_out_heads_whose_write_is_a_sliver_of_the_state():
    report = synthetic_report()
    report.table.loc[2, "write_share"] = 0.01  # (1, 0): the longest memory that moves the logits, but a tiny write
    layer, head, reason = choose_demo_cell(report=report)
    assert (layer, head) == (0, 1) and "1 heads whose current write is under 5% of their state" in reason
    assert choose_demo_cell(report=report, min_write_share=0.0)[:2] == (1, 0)
    assert "left out" not in choose_demo_cell(report=synthetic_report())[2]  # none below the floor: no remark
    with pytest.raises(ValueError, match="min_write_share"):
        choose_demo_cell(report=report, min_write_share=1.5)
    with pytest.raises(ValueError, match="write share of at least 0.95"):
        choose_demo_cell(report=report, min_write_share=0.95)


def test_bad_input_is_refused_with_the_valid_values(qwen35_pair):
    model = qwen35_pair[1]
    tokens = random_tokens(model, 1, 20)
    with pytest.raises(ValueError, match="too short"):
        memory_report(model, tokens, MemorySettings(first_position=4, max_lag=16), progress=False)
    attention = [layer for layer in range(model.cfg.n_layers) if layer not in model.cfg.recurrent_layers]
    with pytest.raises(ValueError, match="not recurrent layers"):
        memory_report(model, tokens, SMALL, layers=attention, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        memory_report(model, tokens, MemorySettings(first_position=2, max_lag=10, threshold=1.5), progress=False)
    with pytest.raises(ValueError, match="integer tensor"):
        memory_report(model, tokens.float(), SMALL, progress=False)


def test_inspect_command_writes_its_outputs_and_keeps_an_earlier_run(tmp_path):
    from mamba2_factory import build_checkpoint_with_tokenizer

    from writesae_lens.cli import main

    folder = build_checkpoint_with_tokenizer(tmp_path / "model")
    out = tmp_path / "report"
    argv = ["inspect", "--model", str(folder), "--passages", "2", "--passage-len", "30", "--max-lag", "8",
            "--sources", "2", "--first-position", "4", "--out", str(out)]
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == {"memory.csv", "curves.csv", "memory.png", "summary.txt",
                                               "settings.json"}
    table = pd.read_csv(out / "memory.csv")
    assert len(table) == 2 * 4  # 2 layers x 4 heads
    assert "suggested cell: layer" in (out / "summary.txt").read_text()
    before = (out / "memory.csv").read_bytes()
    assert main(argv) == 2  # a non-empty --out is refused without --overwrite
    assert (out / "memory.csv").read_bytes() == before
    assert main([*argv[:-2], "--passage-len", "10", "--out", str(tmp_path / "short")]) == 2


@pytest.mark.parametrize("family", ["qwen35", "mamba2", "rwkv7"])
def test_every_family_gets_a_complete_report(family, qwen35_pair, mamba2_pair):
    from family_models import family_model

    model = family_model(family, qwen35_pair, mamba2_pair)
    report = memory_report(model, random_tokens(model, 2, 16), MemorySettings(first_position=2, max_lag=8,
                                                                              sources_per_passage=2), progress=False)
    table = report.table
    assert len(table) == len(model.cfg.recurrent_layers) * model.cfg.n_heads
    assert sorted(set(table["layer"])) == list(model.cfg.recurrent_layers)
    numbers = table.drop(columns=["layer", "head"]).to_numpy(dtype=float)
    assert np.isfinite(numbers).all()
    decays = table[["decay_q10", "decay_q50", "decay_q90"]].to_numpy()
    assert ((decays > 0) & (decays <= 1)).all()
    assert (table["decay_q10"] <= table["decay_q50"]).all() and (table["decay_q50"] <= table["decay_q90"]).all()
    assert ((table["memory_length"] >= 1) & (table["memory_length"] <= 9)).all()
    assert (table["kl_zero"] >= 0).all() and (table["kl_memory"] >= 0).all()
    assert len(report.curves) == len(table) * 8
