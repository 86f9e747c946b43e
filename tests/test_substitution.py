"""The substitution test and the intervention helpers, against the hook path and the naive reference."""

import pytest
import torch

from naive_recurrence import naive_edited_layer
from substitution_checks import assert_records_match_hook_path
from writesae_lens import interventions as iv
from writesae_lens.evaluation.records import RECORD_COLUMNS
from writesae_lens.evaluation.stats import format_summary, summarize
from writesae_lens.evaluation.substitution import head_states, replacement_test

LAYER, HEAD = 1, 2


@pytest.fixture(scope="module")
def model(qwen35_pair):
    return qwen35_pair[1]


@pytest.fixture(scope="module")
def passages():
    return torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(31))


@pytest.fixture(scope="module")
def sae(model, passages):
    """A WriteSAE on head HEAD's states: random factors, decoder bias at the data mean, so that it fires."""
    import writesae_lens.saes as ws

    cfg = model.cfg
    torch.manual_seed(0)
    sae = ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=cfg.d_k * cfg.d_v, d_sae=32, d_k=cfg.d_k, d_v=cfg.d_v, k=4))
    states, _ = head_states(model, passages, LAYER, HEAD)
    with torch.no_grad():
        sae.b_dec.copy_(states.flatten(0, 1).mean(0))
    return sae


@pytest.mark.parametrize("timing,kl_at", [("after_read", "next"), ("write", "next"), ("after_read", "end")])
def test_records_equal_the_hook_path(model, sae, passages, timing, kl_at):
    records = replacement_test(model, sae, LAYER, HEAD, passages, max_firings_per_feature=3, max_firings=24,
                               timing=timing, kl_at=kl_at, batch_size=15, progress=False)
    assert list(records.columns)[: len(RECORD_COLUMNS)] == list(RECORD_COLUMNS)
    assert len(records) >= 12
    assert assert_records_match_hook_path(model, sae, LAYER, HEAD, passages, records, timing, kl_at) >= 20
    assert model.cfg.d_k != model.cfg.d_v
    if timing == "after_read":
        assert (records.position < passages.shape[1] - 1).all()


def test_statistics_run_on_the_records(model, sae, passages, tmp_path):
    from writesae_lens.evaluation.plots import plot_kl_scatter
    from writesae_lens.evaluation.records import load_records, save_records

    records = replacement_test(model, sae, LAYER, HEAD, passages, max_firings_per_feature=5, progress=False)
    summary = summarize(records, n_cluster_resamples=200, n_permutations=200, n_atom_resamples=200)
    text = format_summary(summary)
    assert "win" in text.lower()
    path = save_records(records, tmp_path / "records.csv")
    assert load_records(path).shape == records.shape
    assert plot_kl_scatter(records, tmp_path / "scatter.png").stat().st_size > 1000


def test_caps_and_seed(model, sae, passages):
    a = replacement_test(model, sae, LAYER, HEAD, passages, max_firings_per_feature=2, seed=1, progress=False)
    b = replacement_test(model, sae, LAYER, HEAD, passages, max_firings_per_feature=2, seed=1, progress=False)
    assert a.equals(b)
    assert a.groupby("feature").size().max() <= 2
    c = replacement_test(model, sae, LAYER, HEAD, passages, max_firings=5, seed=1, progress=False)
    assert len(c) == 5


def test_bad_input(model, sae, passages):
    with pytest.raises(ValueError, match=r"layer 3 is not a recurrent layer.*\[0, 1, 2\]"):
        replacement_test(model, sae, 3, HEAD, passages, progress=False)
    with pytest.raises(ValueError, match="head 7 is out of range"):
        replacement_test(model, sae, LAYER, 7, passages, progress=False)
    sae.cfg.metadata.hook_head_index = 0
    try:
        with pytest.raises(ValueError, match="trained on head 0"):
            replacement_test(model, sae, LAYER, HEAD, passages, progress=False)
    finally:
        sae.cfg.metadata.hook_head_index = None
    sae.cfg.metadata.hook_name = "blocks.0.mixer.hook_state"
    try:
        with pytest.raises(ValueError, match="trained on 'blocks.0.mixer.hook_state'"):
            replacement_test(model, sae, LAYER, HEAD, passages, progress=False)
    finally:
        sae.cfg.metadata.hook_name = None
    with torch.no_grad():
        saved = sae.b_dec.clone()
        sae.b_enc.fill_(-1e6)  # nothing fires
    try:
        with pytest.raises(ValueError, match="no firings"):
            replacement_test(model, sae, LAYER, HEAD, passages, progress=False)
    finally:
        with torch.no_grad():
            sae.b_enc.zero_()
            sae.b_dec.copy_(saved)


# ---------------------------------------------------------------- intervention helpers vs the naive reference

FACTORS = ("hook_read_q", "hook_write_k", "hook_write_v", "hook_write_beta", "hook_decay")


@pytest.fixture(scope="module")
def native(model, passages):
    with torch.no_grad():
        _, cache = model.run_with_cache(passages, names_filter=[iv.mixer_hook(LAYER, n) for n in FACTORS])
    return {n: cache[iv.mixer_hook(LAYER, n)] for n in FACTORS}


def reads_with(model, passages, hooks):
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(passages, names_filter=iv.mixer_hook(LAYER, "hook_read"))
    return cache[iv.mixer_hook(LAYER, "hook_read")]


def naive_reads(native, **edits):
    return naive_edited_layer(*(native[n] for n in FACTORS), **edits)[0].float()


CELLS = [(0, 4, HEAD), (1, 20, 0), (2, 39, HEAD)]


def native_write(native, b, t, h):
    return native["hook_write_beta"][b, t, h] * torch.outer(native["hook_write_k"][b, t, h], native["hook_write_v"][b, t, h])


@pytest.mark.parametrize("timing", ["after_read", "write"])
def test_delete_and_substitute_match_naive(model, passages, native, sae, timing):
    atoms = iv.atom_matrices(sae, [3, 5, 7], 3)
    coefficients = torch.tensor([0.5, 2.0, -1.0])
    hooks = iv.substitute_atom(LAYER, CELLS, sae, [3, 5, 7], coefficients, "natural", timing)
    key = "adds_after" if timing == "after_read" else "adds_before"
    expected = {c: coefficients[i] * atoms[i] - native_write(native, *c) for i, c in enumerate(CELLS)}
    assert torch.allclose(reads_with(model, passages, hooks), naive_reads(native, **{key: expected}), atol=1e-5)
    deleted = {c: -native_write(native, *c) for c in CELLS}
    assert torch.allclose(reads_with(model, passages, iv.delete_write(LAYER, CELLS, timing)),
                          naive_reads(native, **{key: deleted}), atol=1e-5)


def test_native_norm_amplitude_and_direction(model, passages, native, sae):
    hooks = iv.substitute_atom(LAYER, CELLS, sae, 4, amplitude="native_norm", timing="write")
    atom = iv.atom_matrices(sae, [4], 1)[0]
    expected = {}
    for c in CELLS:
        w = native_write(native, *c)
        expected[c] = atom * (w.norm() / atom.norm()) - w
    assert torch.allclose(reads_with(model, passages, hooks), naive_reads(native, adds_before=expected), atol=1e-5)
    key, value = torch.randn(model.cfg.d_k), torch.randn(model.cfg.d_v)
    direction = torch.outer(key, value) / torch.outer(key, value).norm()
    hooks = iv.add_direction(LAYER, CELLS, key, value, relative_magnitude=0.5)
    expected = {c: 0.5 * native_write(native, *c).norm() * direction for c in CELLS}
    assert torch.allclose(reads_with(model, passages, hooks), naive_reads(native, adds_before=expected), atol=1e-5)


def test_amplify_features_adds_to_every_position(model, passages, native, sae):
    hooks = iv.amplify_features(LAYER, HEAD, sae, {1: 0.3, 2: -0.2})
    atoms = iv.atom_matrices(sae, [1, 2], 2)
    matrix = 0.3 * atoms[0] - 0.2 * atoms[1]
    b, p = passages.shape
    expected = {(i, t, HEAD): matrix for i in range(b) for t in range(p)}
    assert torch.allclose(reads_with(model, passages, hooks), naive_reads(native, adds_before=expected), atol=1e-5)
    prompt = passages[:1, :5]
    with model.hooks(fwd_hooks=hooks):
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False,
                                  use_past_kv_cache=False)
    assert torch.equal(cached, uncached)


def test_erase_atom_removes_its_contribution(model, passages, native, sae):
    """Wherever the atom is active in S_t, S_t is replaced by S_t - a_i(t) A_i and the recurrence continues."""
    states, _ = head_states(model, passages, LAYER, HEAD)
    codes = sae.encode(states).detach()
    atom = int(codes.flatten(0, 1).gt(0).sum(0).argmax())
    matrix = iv.atom_matrices(sae, [atom], 1)[0]
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    sets = {(b, t, HEAD): states[b, t].reshape(d_k, d_v) - codes[b, t, atom] * matrix
            for b, t in (codes[..., atom] > 0).nonzero().tolist()}
    assert len(sets) >= 2
    got = reads_with(model, passages, iv.erase_atom(LAYER, HEAD, sae, atom))
    assert torch.allclose(got, naive_reads(native, state_sets=sets), atol=1e-5)


def test_helpers_reject_bad_cells(model, passages, sae):
    with pytest.raises(IndexError, match="position 99 out of range"):
        model.run_with_hooks(passages, fwd_hooks=iv.delete_write(LAYER, [(0, 99, 0)]))
    with pytest.raises(ValueError, match=r"shape \[n, 3\]"):
        iv.delete_write(LAYER, [(0, 1)])
    with pytest.raises((ValueError, TypeError), match="timing"):  # beartype's check under the test hook
        iv.delete_write(LAYER, [(0, 1, 0)], timing="later")
    with pytest.raises(ValueError, match="atoms must be"):
        iv.substitute_atom(LAYER, [(0, 1, 0)], sae, [99], [1.0])
