"""The amplification probe: a push equals encode, add to the codes, decode and add back the residual; rows equal
each prompt and condition sampled alone with its seed; the selection and the statistics equal direct computations
(scipy for the tests)."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from sae_checks import firing_sae
from writesae_lens import pipeline
from writesae_lens.generation import Push, generate_rows
from writesae_lens.generation.amplification import (METRICS, AmplificationSettings, amplification_probe,
                                                    boundary_mask, push_matrix, text_metrics)
from writesae_lens.models import load_hooked_model

LAYER = 1


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = load_hooked_model("qwen35-tiny")
    _, docs = pipeline.split_documents(pipeline.load_texts(None)[:60])
    passages = pipeline.token_passages(model, docs, 6, 48)
    saes = {head: firing_sae(model, passages, LAYER, head, d_sae=16, k=4, seed=head) for head in (0, 2)}
    prompts = [passages[i, :10] for i in range(4)]
    period = model.tokenizer.encode(".")[0]
    settings = AmplificationSettings(doses=(2.0, 5.0), n_top=3, max_new_tokens=16, n_resamples=400,
                                     n_control_states=200)
    result = amplification_probe(model, saes, LAYER, prompts, passages, period, settings)
    return model, saes, passages, prompts, period, settings, result


def test_a_push_equals_the_encode_add_decode_loop():
    """For a linear decoder, decode(z + push) + (S - decode(z)) - S = sum_f push_f A_f, whatever S."""
    import writesae_lens.saes as ws

    torch.manual_seed(0)
    sae = ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=6 * 5, d_sae=10, d_k=6, d_v=5, k=3))
    state = torch.randn(1, 30)
    features, pushes = [1, 4, 7], [0.5, -2.0, 1.25]
    with torch.no_grad():
        code = sae.encode(state)
        pushed = code.clone()
        pushed[0, features] += torch.tensor(pushes)
        looped = sae.decode(pushed) + (state - sae.decode(code))
    assert torch.allclose((looped - state)[0].reshape(6, 5), push_matrix(sae, features, pushes), atol=1e-5)


def test_rows_equal_each_prompt_and_condition_sampled_alone(setup):
    model, saes, passages, prompts, period, settings, result = setup
    from writesae_lens.generation.amplification import condition_pushes

    conditions = condition_pushes(saes, result.features, settings)
    assert list(conditions) == result.conditions == ["baseline", "2x", "5x", "random 10x"]
    for c, name in enumerate(result.conditions):
        p = c % len(prompts)
        seed = int(np.random.SeedSequence([settings.seed, p, c]).generate_state(1)[0])
        pushes = [Push(0, LAYER, head, m) for head, m in conditions[name].items()]
        alone = generate_rows(model, [prompts[p]], max_new_tokens=settings.max_new_tokens, pushes=pushes,
                              do_sample=True, temperature=settings.temperature, seeds=[seed])
        record = result.records[(result.records.prompt == p) & (result.records.condition == name)].iloc[0]
        assert model.tokenizer.decode(alone.tokens[0].tolist(), skip_special_tokens=True) == record.text
        assert {m: record[m] for m in METRICS} == text_metrics(record.text)


def test_the_floor_is_the_baseline_sampled_twice(setup):
    """The baseline's repeat (same prompt and seed, another row of the same call) is not a record; in float32 it gives
    the same text, so the floor is 0 and the summary says so."""
    from writesae_lens.generation.amplification import REPEAT, format_amplification_summary, sampling_floor

    *_, prompts, _, _, result = setup
    assert REPEAT not in set(result.records.condition)
    assert result.floor["prompts"] == len(prompts) and result.floor["texts_differ"] == 0
    assert all(result.floor[f"max_diff_{m}"] == 0 for m in METRICS)
    assert "numerical floor" in format_amplification_summary(result.summary, result.floor)
    # a repeat that differs is counted
    base = result.records[result.records.condition == "baseline"].copy()
    repeat = base.assign(condition=REPEAT)
    repeat.loc[repeat.index[0], "text"] = "something else"
    repeat.loc[repeat.index[0], "newlines"] = base["newlines"].iloc[0] + 3
    floor = sampling_floor(pd.concat([base, repeat]))
    assert floor["texts_differ"] == 1 and floor["max_diff_newlines"] == 3


def test_selection_equals_the_direct_computation(setup):
    model, saes, passages, prompts, period, settings, result = setup
    from writesae_lens.evaluation.firings import head_states

    boundary = boundary_mask(passages, period).flatten()
    n = min(int(boundary.sum()), int((~boundary).sum()), settings.max_samples)
    for head, sae in saes.items():
        chosen = result.features[(result.features["head"] == head) & (result.features.kind == "boundary")]
        states = head_states(model, passages, LAYER, head)[0].flatten(0, 1)
        rng = np.random.default_rng(settings.selection_seed)
        b = rng.choice(np.flatnonzero(boundary.numpy()), n, replace=False)
        o = rng.choice(np.flatnonzero(~boundary.numpy()), n, replace=False)
        with torch.no_grad():
            diff = (sae.encode(states[b]).mean(0) - sae.encode(states[o]).mean(0)).numpy()
        top = np.argsort(-np.abs(diff), kind="stable")[: settings.n_top]
        assert sorted(chosen.feature) == sorted(top.tolist())
        assert np.allclose(chosen.mean_diff, diff[chosen.feature], atol=1e-6)
        random = result.features[(result.features["head"] == head) & (result.features.kind == "random")]
        assert not set(random.feature) & set(chosen.feature)


def test_summary_equals_scipy(setup):
    *_, result = setup
    records, summary = result.records, result.summary
    for metric in METRICS:
        wide = records.pivot(index="prompt", columns="condition", values=metric)
        for condition in result.conditions[1:]:
            row = summary[(summary.metric == metric) & (summary.condition == condition)].iloc[0]
            assert row["mean"] == pytest.approx(wide[condition].mean())
            diff = wide[condition] - wide["baseline"]
            if diff.std() > 0:
                ref = sps.ttest_rel(wide[condition], wide["baseline"])
                assert row.p == pytest.approx(ref.pvalue)
                assert row.p_adj == pytest.approx(min(1.0, 3 * ref.pvalue))
                assert row.cohens_dz == pytest.approx(diff.mean() / diff.std(ddof=1))


def test_text_metrics():
    assert text_metrics("one two\n\nthree\nfour") == {"newlines": 3.0, "paragraphs": 2.0, "mean_word_length": 3.75}


def test_bad_input_is_a_clear_error(setup):
    model, saes, passages, prompts, period, settings, _ = setup
    with pytest.raises(ValueError, match="boundary token"):
        amplification_probe(model, saes, LAYER, prompts, passages, model.cfg.d_vocab + 5, settings)
    with pytest.raises(ValueError, match="out of range"):
        amplification_probe(model, {99: saes[0]}, LAYER, prompts, passages, period, settings)
