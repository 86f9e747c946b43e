"""Feature dashboards (``writesae_lens.dashboard``, issue #19): every number a page shows against a direct
computation on the tiny random models of every family (non-square heads, GQA / grouped Mamba-2): the top contexts
are the top codes of ``sae.encode`` on the head's states, the density and histogram are those of the non-zero codes
(numpy), the key / value token lists are the cosines with each token's mean ``hook_write_k`` / ``hook_write_v``
(read from the hooks, not from the scan), the logit effects are ``W_U^T W_O[h] q`` from the output projection's
weights, the win rates are the Wilson intervals of statsmodels (z = 1.96); and the rendered files hold those numbers."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from family_models import family_model
from sae_checks import firing_sae
from writesae_lens.dashboard import atom_dashboards, build_dashboard_data, scan_for_dashboards, write_dashboard
from writesae_lens.dashboard import stats as dstats
from writesae_lens.dashboard.render import CSP, atom_page_name
from writesae_lens.evaluation.firings import head_states
from writesae_lens.evaluation.records import RECORD_COLUMNS

LAYER, HEAD = 1, 2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen35", "mamba2", "rwkv7"])
def cell(request, qwen35_pair, mamba2_pair):
    model = family_model(request.param, qwen35_pair, mamba2_pair)
    tokens = torch.randint(0, 90, (5, 24), generator=torch.Generator().manual_seed(4))
    sae = firing_sae(model, tokens, LAYER, HEAD, d_sae=24, k=4, seed=1)
    scan = scan_for_dashboards(model, sae, LAYER, HEAD, tokens, batch_size=2, progress=False)
    data = atom_dashboards(model, sae, scan, n_atoms=None, n_contexts=5, left=3, right=2, n_tokens=4,
                           min_token_count=2, progress=False)
    return request.param, model, sae, tokens, scan, data


def direct_codes(model, sae, tokens):
    states, _ = head_states(model, tokens, LAYER, HEAD)
    return sae.encode(states.to(sae.dtype)).detach().float()  # [n, pos, d_sae]


def test_top_contexts_are_the_top_codes_of_the_scan(cell):
    _, model, sae, tokens, _, data = cell
    codes = direct_codes(model, sae, tokens)
    n_pos = tokens.shape[1]
    assert data.atoms, "the random SAE should fire"
    for page in data.atoms:
        column = codes[..., page.atom].flatten().numpy()  # passage-major = scan order
        order = np.argsort(-column, kind="stable")
        order = order[column[order] > 0][:5]
        ctx = page.top_contexts
        np.testing.assert_array_equal(ctx["passage"], order // n_pos)
        np.testing.assert_array_equal(ctx["position"], order % n_pos)
        np.testing.assert_allclose(ctx["code"], column[order], rtol=1e-6)
        for row in ctx.itertuples():
            lo, hi = max(0, row.position - 3), min(n_pos, row.position + 3)
            assert row.context_tokens == tokens[row.passage, lo:hi].tolist()
            np.testing.assert_allclose(row.context_codes, codes[row.passage, lo:hi, page.atom].numpy(), rtol=1e-6)
            assert row.context_tokens[row.focus] == row.token == tokens[row.passage, row.position]


def test_density_and_histogram_match_numpy(cell):
    _, model, sae, tokens, _, data = cell
    codes = direct_codes(model, sae, tokens)
    for page in data.atoms:
        fired = codes[..., page.atom][codes[..., page.atom] > 0].double().numpy()
        a = page.activation
        assert a["n_firings"] == fired.size and a["density"] == pytest.approx(fired.size / tokens.numel())
        assert a["max"] == pytest.approx(fired.max(), rel=1e-6)
        assert a["median"] == pytest.approx(np.median(fired), rel=1e-5)
        counts, edges = np.histogram(fired, bins=30)
        assert a["counts"] == counts.tolist()
        np.testing.assert_allclose(a["edges"], edges, rtol=1e-5)
    alive = (codes > 0).flatten(0, 1).any(0).nonzero().flatten().tolist()
    assert [p.atom for p in data.atoms] == alive


def test_logit_effects_equal_the_closed_form_out_path(cell):
    _, model, sae, _, _, data = cell
    mixer = model.blocks[LAYER].mixer
    d_v = model.cfg.d_v
    w_o = mixer.output_projection.weight.detach().double()[:, HEAD * d_v : (HEAD + 1) * d_v]  # [d_model, d_v]
    w_u = model.W_U.detach().double()  # [d_model, d_vocab]
    for page in data.atoms:
        q = sae.W_dec_value.detach().double()[page.atom, 0]
        direct = torch.einsum("mv,v,mt->t", w_o, q, w_u)  # <W_O q, W_U[:, tok]>
        effects = page.logit_effects
        promoted = effects[effects["side"] == "promoted"]
        suppressed = effects[effects["side"] == "suppressed"]
        assert promoted["token"].tolist() == direct.topk(4).indices.tolist()
        assert suppressed["token"].tolist() == (-direct).topk(4).indices.tolist()
        np.testing.assert_allclose(promoted["effect"], direct[promoted["token"].tolist()].numpy(), rtol=1e-9)
        np.testing.assert_allclose(suppressed["effect"], direct[suppressed["token"].tolist()].numpy(), rtol=1e-9)
        counts, _ = np.histogram(direct.numpy(), bins=30)
        assert page.logit_histogram["counts"] == counts.tolist()


def mean_vectors_from_hooks(model, tokens, name):
    """Each token's mean of one head's ``hook_write_k`` / ``hook_write_v`` over ``tokens``, read from a cache."""
    _, cache = model.run_with_cache(tokens, names_filter=[f"blocks.{LAYER}.mixer.hook_{name}"])
    vectors = cache[f"blocks.{LAYER}.mixer.hook_{name}"][:, :, HEAD].double().flatten(0, 1)  # [n * pos, d]
    ids = tokens.flatten()
    means = {}
    for t in ids.unique().tolist():
        if (ids == t).sum() >= 2:
            means[t] = vectors[ids == t].mean(0)
    return means


@pytest.mark.parametrize("side", ["key", "value"])
def test_aligned_tokens_are_the_cosines_with_the_mean_hooked_vectors(cell, side):
    _, model, sae, tokens, _, data = cell
    means = mean_vectors_from_hooks(model, tokens, "write_k" if side == "key" else "write_v")
    factors = (sae.W_dec_key if side == "key" else sae.W_dec_value).detach().double()[:, 0]  # [d_sae, d]
    ids = sorted(means)
    stacked = torch.stack([means[t] for t in ids])
    for page in data.atoms[:6]:
        cos = torch.nn.functional.cosine_similarity(stacked, factors[page.atom][None], dim=-1)
        table = getattr(page, f"{side}_tokens")
        top = table[table["side"] == "top"]
        bottom = table[table["side"] == "bottom"]
        expected_top = [ids[i] for i in torch.argsort(cos, descending=True, stable=True)[:4].tolist()]
        expected_bottom = [ids[i] for i in torch.argsort(cos, stable=True)[:4].tolist()]
        assert top["token"].tolist() == expected_top and bottom["token"].tolist() == expected_bottom
        lookup = dict(zip(ids, cos.tolist()))
        np.testing.assert_allclose(top["score"], [lookup[t] for t in expected_top], rtol=1e-5, atol=1e-6)
        assert top["count"].tolist() == [int((tokens == t).sum()) for t in expected_top]


def test_rank_two_alignment_is_the_fraction_in_the_span():
    g = torch.Generator().manual_seed(0)
    factors, vectors = torch.randn(2, 6, generator=g), torch.randn(9, 6, generator=g)
    basis, _ = np.linalg.qr(factors.double().numpy().T)
    v = vectors.double().numpy()
    expected = np.linalg.norm(v @ basis, axis=1) / np.linalg.norm(v, axis=1)
    np.testing.assert_allclose(dstats.factor_alignment(factors, vectors).numpy(), expected, rtol=1e-10)
    in_span = factors[0] * 2 - factors[1]
    assert dstats.factor_alignment(factors, in_span[None]).item() == pytest.approx(1.0)
    assert dstats.factor_alignment(factors[:1], torch.zeros(1, 6)).item() == 0.0


def synthetic_records(atoms, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for atom in atoms:
        for i in range(7 + atom % 5):
            rows.append({name: 0 for name in RECORD_COLUMNS} | {
                "atom": atom, "feature": atom, "passage": i, "kl_atom": rng.random(), "kl_delete": rng.random()})
    frame = pd.DataFrame(rows)
    frame.loc[0, "kl_delete"] = frame.loc[0, "kl_atom"]  # a tie: a loss
    return frame


def test_partition_and_win_rates_join(cell):
    _, model, sae, _, scan, _ = cell
    alive = np.flatnonzero(np.bincount(scan.feature, minlength=sae.cfg.d_sae)).tolist()
    records = synthetic_records(alive[:3])
    partition = pd.DataFrame({"atom": range(sae.cfg.d_sae), "n_firings": 3, "class": "bundle",
                              "median_cos": np.linspace(-0.5, 0.5, sae.cfg.d_sae)})
    partition.loc[alive[0], "class"] = "register"
    partition.loc[alive[1], "median_cos"] = np.nan
    data = atom_dashboards(model, sae, scan, atoms=alive[:4], partition=partition, records=records, progress=False)
    first = data.atoms[0]
    assert first.partition == {"class": "register", "median_cos": pytest.approx(partition.median_cos[alive[0]]),
                               "n_firings": 3}
    assert data.atoms[1].partition["median_cos"] is None
    for page in data.atoms[:3]:
        group = records[records["atom"] == page.atom]
        wins = int((group["kl_atom"] < group["kl_delete"]).sum())
        # the library's Wilson interval uses z = 1.96 exactly: the same z for statsmodels
        low, high = proportion_confint(wins, len(group), alpha=2 * norm.sf(1.96), method="wilson")
        s = page.substitution
        assert (s["wins"], s["n"]) == (wins, len(group))
        assert s["low"] == pytest.approx(low) and s["high"] == pytest.approx(high)
    assert data.atoms[3].substitution is None


def test_pages_and_json_hold_the_numbers(cell, tmp_path):
    family, _, _, _, _, data = cell
    if family != "qwen35":
        pytest.skip("rendering does not depend on the family")
    written = write_dashboard(data, tmp_path, progress=False)
    assert (tmp_path / "index.html") in written and len(written) == len(data.atoms) + 2
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    csp = f'content="{CSP}"'
    assert csp in index and "http://" not in index and "https://" not in index
    page = data.atoms[0]
    html = (tmp_path / "atoms" / atom_page_name(page.atom)).read_text(encoding="utf-8")
    assert f'href="atoms/{atom_page_name(page.atom)}"' in index
    assert csp in html and "<script" not in html and "http://" not in html
    for token in page.logit_effects["token"]:
        assert f'data-token-id="{token}"' in html
    assert f'data-code="{page.top_contexts["code"].iloc[0]}"' in html
    features = json.loads((tmp_path / "features.json").read_text(encoding="utf-8"))
    feature = features["features"][0]
    assert feature["feature_index"] == page.atom
    assert feature["frac_nonzero"] == page.activation["density"]
    assert len(feature["freq_hist_data_bar_heights"]) == len(feature["freq_hist_data_bar_values"])
    promoted = page.logit_effects[page.logit_effects["side"] == "promoted"]
    assert feature["pos_values"] == promoted["effect"].tolist()
    assert feature["pos_str"] == [data.token_text[t] for t in promoted["token"]]
    assert feature["activations"][0]["values"] == page.top_contexts["context_codes"].iloc[0]


def test_choosing_atoms_and_bad_input(cell):
    _, model, sae, tokens, scan, _ = cell
    data = atom_dashboards(model, sae, scan, atoms=[3, 3, 0], progress=False)
    assert [p.atom for p in data.atoms] == [3, 0]
    with pytest.raises(ValueError, match="out of range"):
        atom_dashboards(model, sae, scan, atoms=[sae.cfg.d_sae], progress=False)
    with pytest.raises(ValueError, match="n_contexts"):
        atom_dashboards(model, sae, scan, n_contexts=0, progress=False)
    with pytest.raises(KeyError, match="median_cos"):
        atom_dashboards(model, sae, scan, partition=pd.DataFrame({"atom": [0], "class": ["x"]}), progress=False)
    with pytest.raises(ValueError, match="not a recurrent layer"):
        build_dashboard_data(model, sae, 99, HEAD, tokens, progress=False)
    with pytest.raises(ValueError, match="n_passages, n_pos"):
        scan_for_dashboards(model, sae, LAYER, HEAD, tokens[0], progress=False)
