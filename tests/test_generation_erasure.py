"""Single-atom erasure: erasing removes exactly the atom's component, every record equals the hook path on the
prefix alone, the statistics equal scipy, bad input is a clear error."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from sae_checks import firing_sae
from test_padding import family_model
from writesae_lens import interventions as iv
from writesae_lens.generation.engine import edit_hooks
from writesae_lens.generation.erasure import ErasureSettings, atom_edits, erasure_probe

LAYER, HEAD = 1, 2


@pytest.fixture(scope="module")
def setup(qwen35_folders, mamba2_folders):
    torch.set_num_threads(1)
    model = family_model("qwen35", qwen35_folders, mamba2_folders)
    passages = torch.randint(0, model.cfg.d_vocab, (4, 14), generator=torch.Generator().manual_seed(0))
    sae = firing_sae(model, passages, LAYER, HEAD, d_sae=12, k=3)
    return model, sae, passages


def test_erasing_removes_exactly_the_atoms_component(setup):
    """After the edit, the state is the SAE's reconstruction with only that coefficient zeroed plus the unchanged
    residual: S' = decode(z with z_i = 0) + (S - decode(z))."""
    model, sae, passages = setup
    tokens = passages[:1, :9]
    t = 8
    native_cache, edited_cache = model.empty_cache(), model.empty_cache()
    model(tokens, cache=native_cache)
    state = native_cache.recurrent_state(LAYER)[0, HEAD].flatten()  # [d_k * d_v]
    code = sae.encode(state[None])[0].detach()
    feature = int(code.argmax())
    assert code[feature] > 0
    edits = [(0, t, e) for e in atom_edits(sae, feature, 0, t, LAYER, HEAD, -float(code[feature]))]
    with model.hooks(fwd_hooks=edit_hooks(model, edits, [])):
        model(tokens, cache=edited_cache)
    edited = edited_cache.recurrent_state(LAYER)[0, HEAD].flatten()
    without = code.clone()
    without[feature] = 0
    with torch.no_grad():
        expected = sae.decode(without[None])[0] + (state - sae.decode(code[None])[0])
    assert torch.allclose(edited, expected, atol=1e-5)
    others = [h for h in range(model.cfg.n_heads) if h != HEAD]
    assert torch.equal(edited_cache.recurrent_state(LAYER)[0, others], native_cache.recurrent_state(LAYER)[0, others])


@pytest.fixture(scope="module")
def probe(setup):
    model, sae, passages = setup
    settings = ErasureSettings(n_eval=5, n_nonfiring=4, multipliers=(1.0, 3.0), n_dose=3, dose_multipliers=(1.0, 8.0),
                               n_resamples=500)
    from writesae_lens.evaluation.firings import scan_firings

    scan = scan_firings(model, sae, LAYER, HEAD, passages, progress=False)
    feature = int(np.bincount(scan.feature[scan.position < passages.shape[1] - 1]).argmax())  # the busiest
    return feature, erasure_probe(model, sae, LAYER, HEAD, feature, passages, settings)


def logp_at(model, tokens, hooks, token):
    logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0, -1]
    return float(torch.log_softmax(logits.detach().float(), -1)[token])


def test_records_equal_the_hook_path(setup, probe):
    model, sae, passages = setup
    feature, result = probe
    token = result.preferred_token
    atom = iv.atom_matrices(sae, [feature], 1)[0]
    for r in result.erasure.itertuples():
        prefix = passages[r.passage, : r.position + 2]
        cell = [(0, r.position, HEAD)]
        native = logp_at(model, prefix, [], token)
        delete = logp_at(model, prefix, iv.delete_write(LAYER, cell), token)
        erased = logp_at(model, prefix, iv.add_to_state(LAYER, cell, -r.code * atom), token)
        assert r.delta_delete == pytest.approx(delete - native, abs=1e-5)
        assert r.delta_atom == pytest.approx(erased - native, abs=1e-5)
    for r in result.nonfiring.itertuples():
        prefix = passages[r.passage, : r.position + 2]
        written = logp_at(model, prefix, iv.add_to_state(LAYER, [(0, r.position, HEAD)], r.m * result.a_star * atom),
                          token)
        assert r.delta == pytest.approx(written - logp_at(model, prefix, [], token), abs=1e-5)


def test_the_preferred_token_maximises_the_summed_detection_difference(setup, probe):
    feature, result = probe
    assert result.detection.token.iloc[0] == result.preferred_token
    assert (np.diff(result.detection.summed_diff) <= 0).all()


def test_summary_equals_scipy(probe):
    _, result = probe
    e = result.erasure
    assert result.summary["delete"]["median"] == pytest.approx(np.median(e.delta_delete))
    assert result.summary["delete"]["wilcoxon_p"] == pytest.approx(sps.wilcoxon(e.delta_delete).pvalue)
    fit = sps.linregress(result.dose.m, result.dose.delta)
    assert result.summary["dose_fit"]["slope"] == pytest.approx(fit.slope)
    assert result.summary["dose_fit"]["p"] == pytest.approx(fit.pvalue)


def test_bad_input_is_a_clear_error(setup):
    import writesae_lens.saes as ws

    model, sae, passages = setup
    with pytest.raises(ValueError, match="feature 99"):
        erasure_probe(model, sae, LAYER, HEAD, 99, passages)
    other = ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=12 * 8, d_sae=4, d_k=12, d_v=8, k=1))
    with pytest.raises(ValueError, match="does not match model|another model"):
        erasure_probe(model, other, LAYER, HEAD, 0, passages)
    sae.cfg.metadata.hook_head_index = HEAD + 1
    try:
        with pytest.raises(ValueError, match="trained on head"):
            erasure_probe(model, sae, LAYER, HEAD, 0, passages)
    finally:
        sae.cfg.metadata.hook_head_index = None
