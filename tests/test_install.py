"""The three-position install: the edit in the cache equals the documented formula, every record equals its trial
generated alone, the summary equals direct computations, bad input is a clear error."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from test_padding import family_model
from writesae_lens.evaluation.stats import wilson_interval
from writesae_lens.generation import CacheEdit, generate_rows, target_directions
from writesae_lens.generation.engine import edit_hooks
from writesae_lens.generation.install import InstallSettings, install_trials, summarize_install, window_positions
from writesae_lens.generation.targets import TargetClass, ranks_from_logits

LAYER, HEAD = 1, 3  # a Gated DeltaNet layer of the gqa_nonsquare config (4 value heads, 2 key heads, d_k 8, d_v 12)


@pytest.fixture(scope="module")
def model(qwen35_folders, mamba2_folders):
    torch.set_num_threads(1)
    return family_model("qwen35", qwen35_folders, mamba2_folders)


def test_install_edit_in_the_cache_equals_the_formula(model):
    """m |beta k v^T|_F (k/|k|) v_T*^T added after the read at the prompt's last position, with v_T* built here from
    the output projection and the unembedding directly."""
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 10), generator=torch.Generator().manual_seed(0))
    target, m, s = 17, 3.0, 9
    d_v = model.cfg.d_v
    w_o = model.blocks[LAYER].mixer.out_proj.weight[:, HEAD * d_v : (HEAD + 1) * d_v]  # [d_model, d_v]
    raw = w_o.T @ model.unembed.weight[target]
    v_star = raw / raw.norm()
    ours, _ = target_directions(model, LAYER, HEAD, torch.tensor([target]))
    assert torch.allclose(ours[0], v_star, atol=1e-6)

    names = [f"blocks.{LAYER}.mixer.hook_write_{n}" for n in ("k", "v", "beta")]
    _, acts = model.run_with_cache(tokens, names_filter=names)
    k, v, beta = (acts[n][0, s, HEAD] for n in names)
    expected = m * (beta * torch.outer(k, v)).norm() * torch.outer(k / k.norm(), v_star)

    native_cache, edited_cache = model.empty_cache(), model.empty_cache()
    model(tokens, cache=native_cache)
    edit = CacheEdit(0, s, LAYER, HEAD, value=v_star, scale=m, relative=True)
    with model.hooks(fwd_hooks=edit_hooks(model, [(0, s, edit)], [])):
        model(tokens, cache=edited_cache)
    delta = edited_cache.recurrent_state(LAYER) - native_cache.recurrent_state(LAYER)
    assert torch.allclose(delta[0, HEAD], expected, atol=1e-5)
    others = [h for h in range(model.cfg.n_heads) if h != HEAD]
    assert bool((delta[0, others] == 0).all())


def small_run(model):
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.cfg.d_vocab, (n,), generator=generator) for n in (9, 12, 10)]
    classes = [TargetClass("top", 1, 5), TargetClass("mid", 6, 40),
               TargetClass("listed", 1, None, tuple(range(20, 60)), out_of_context=True)]
    settings = InstallSettings(multipliers=(2.0, 40.0), n_windows=2, window=3, max_new_tokens=6, targets_per_class=2)
    return prompts, classes, settings, install_trials(model, LAYER, HEAD, prompts, classes, settings, batch_size=7)


@pytest.fixture(scope="module")
def run(model):
    return small_run(model)


def test_records_equal_each_trial_generated_alone(model, run):
    prompts, classes, settings, records = run
    assert len(records) == len(prompts) * 3 * 2 * settings.n_windows * len(settings.multipliers)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(records), 8, replace=False):
        r = records.iloc[i]
        prompt = prompts[r.prompt]
        direction, _ = target_directions(model, LAYER, HEAD, torch.tensor([r.target]))
        positions = window_positions(len(prompt), settings)[r.window]
        assert positions[0] == r.first_position and positions[-1] == len(prompt) - 2 - r.window
        edits = [CacheEdit(0, s, LAYER, HEAD, value=direction[0], scale=r.m, relative=True) for s in positions]
        alone = generate_rows(model, [prompt], max_new_tokens=settings.max_new_tokens, edits=edits,
                              watch=torch.tensor([[r.target]]))
        assert bool((alone.tokens[0] == r.target).any()) == r.included
        assert int(alone.watch_rank[0, 0, 0]) == r.edited_rank
        assert abs(float(alone.watch_logp[0, 0, 0]) - r.edited_logp) < 1e-5
        native = generate_rows(model, [prompt], max_new_tokens=settings.max_new_tokens, keep_first_logprobs=True)
        assert bool((native.tokens[0] == r.target).any()) == r.native_included
        assert int(ranks_from_logits(native.first_logprobs)[0, r.target]) == r.native_rank
        assert r.lift == pytest.approx(r.edited_logp - r.native_logp)


def test_targets_fall_in_their_class_windows(run):
    prompts, classes, _, records = run
    windows = {c.name: c for c in classes}
    for _, r in records.iterrows():
        c = windows[r.target_class]
        assert c.min_rank <= r.native_rank <= (c.max_rank or 10**9)
        if c.out_of_context:
            assert r.target not in prompts[r.prompt].tolist() and r.target in c.candidates


def test_summary_equals_direct_computations(run):
    records = run[3]
    summary = summarize_install(records)
    for _, row in summary.iterrows():
        g = records if row.target_class == "pooled" else records[records.target_class == row.target_class]
        g = g[g.m == row.m]
        assert row.n == len(g)
        assert row.edited_inclusion == g.included.mean()
        assert (row.edited_low, row.edited_high) == pytest.approx(wilson_interval(int(g.included.sum()), len(g)))
        assert row.median_lift == pytest.approx(np.median(g.lift))
        b = int((g.included & ~g.native_included).sum())
        c = int((~g.included & g.native_included).sum())
        assert row.p_vs_native == pytest.approx(1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5).pvalue)


def test_bad_input_is_a_clear_error(model):
    prompt = [torch.arange(10)]
    ok = [TargetClass("top", 1, 5)]
    with pytest.raises(ValueError, match="past the prompt"):
        install_trials(model, LAYER, HEAD, [torch.arange(4)], ok, InstallSettings(n_windows=2, window=3))
    with pytest.raises(ValueError, match="finite"):
        install_trials(model, LAYER, HEAD, prompt, ok, InstallSettings(multipliers=(float("inf"),), n_windows=1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        install_trials(model, LAYER, HEAD, prompt, [TargetClass("x", 1, None, (5, 10**6))],
                       InstallSettings(n_windows=1))
    with pytest.raises(ValueError, match="does not fit a vocabulary"):
        install_trials(model, LAYER, HEAD, prompt, [TargetClass("rare", 10_000)], InstallSettings(n_windows=1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        target_directions(model, LAYER, HEAD, torch.tensor([model.cfg.d_vocab]))
    with pytest.raises(ValueError, match="not a recurrent layer"):
        target_directions(model, 3, HEAD, torch.tensor([1]))
