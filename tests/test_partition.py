"""The register / bundle partition (``evaluation.partition``), its joins with substitution records
(``evaluation.partition_records``) and the passage bits/token (``evaluation.passage_bits``): cosines against the
materialised matrices, statistics against scikit-learn and scipy called directly, bits/token against the hook path
on the whole passage, on every family."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.mixture import GaussianMixture

from sae_checks import firing_sae
from writesae_lens import interventions as iv
from writesae_lens.evaluation.firings import head_states
from writesae_lens.evaluation.partition import (
    bimodality_coefficient,
    classify,
    delta_values,
    firing_cosines,
    mixture_fits,
    pairwise_write_cosines,
    partition_atoms,
    threshold_table,
    write_cosines,
)
from writesae_lens.evaluation.partition_records import class_win_rates, cosine_bin_table, failure_by_quartile
from writesae_lens.evaluation.passage_bits import passage_bits_per_token, summarize_bits
from writesae_lens.evaluation.records import RECORD_COLUMNS
from family_models import family_model

LAYER, HEAD = 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen35", "mamba2", "rwkv7"])
def family(request, qwen35_pair, mamba2_pair):
    model = family_model(request.param, qwen35_pair, mamba2_pair)
    passages = torch.randint(0, 90, (4, 40), generator=torch.Generator().manual_seed(3))
    return request.param, model, passages


def frobenius_cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=-1)


@pytest.mark.parametrize("rank", [1, 2])
def test_factorised_cosine_equals_the_frobenius_cosine(rank):
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(50, rank, 5, generator=g), torch.randn(50, rank, 7, generator=g)
    k, u = torch.randn(50, 5, generator=g), torch.randn(50, 7, generator=g)
    atoms = torch.einsum("nrk,nrv->nkv", p, q)
    writes = k[:, :, None] * u[:, None, :]
    expected = frobenius_cosine(atoms, writes)
    torch.testing.assert_close(write_cosines(p, q, k, u).double(), expected, rtol=1e-5, atol=1e-6)
    if rank == 1:
        product = frobenius_cosine(p[:, 0], k) * frobenius_cosine(q[:, 0], u)
        torch.testing.assert_close(write_cosines(p, q, k, u).double(), product, rtol=1e-5, atol=1e-6)
    table = pairwise_write_cosines(p[:4], q[:4], k, u)  # every atom with every write
    for a in range(4):
        torch.testing.assert_close(table[a].double(), frobenius_cosine(atoms[a].expand_as(writes), writes),
                                   rtol=1e-5, atol=1e-6)


def test_the_delta_form_is_the_exact_change(family):
    name, model, passages = family
    states, factors = head_states(model, passages, LAYER, HEAD)
    states = states.unflatten(-1, (model.cfg.d_k, model.cfg.d_v)).double()
    u = delta_values(states, factors["k"].double(), factors["decay"])
    decay = factors["decay"].double().exp()
    previous = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], 1)
    decay = decay[..., None, None] if decay.dim() == 2 else decay[..., :, None]
    change = states - decay * previous
    k = factors["k"].double()
    if name == "qwen35":  # the change is k_t delta_t^T, delta_t = beta_t (v_t - a_t S_{t-1}^T k_t) (unit keys)
        torch.testing.assert_close(k[..., :, None] * u[..., None, :], change, atol=1e-5, rtol=1e-4)
        a = factors["decay"].double().exp()
        expected = factors["beta"].double()[..., None] * (
            factors["v"].double() - a[..., None] * torch.einsum("bpkv,bpk->bpv", previous, k))
        torch.testing.assert_close(u, expected, atol=1e-5, rtol=1e-4)
    elif name == "mamba2":  # no erase: the change is the write itself, the delta form is the beta form
        torch.testing.assert_close(u, factors["beta"].double()[..., None] * factors["v"].double(), atol=1e-5,
                                   rtol=1e-4)
    else:  # RWKV-7: the part of the (rank-2) change along the write key
        expected = torch.einsum("bpkv,bpk->bpv", change, k) / k.pow(2).sum(-1, keepdim=True)
        torch.testing.assert_close(u, expected, atol=1e-5, rtol=1e-4)


def test_firing_cosines_against_the_materialised_matrices(family):
    name, model, passages = family
    sae = firing_sae(model, passages, LAYER, HEAD, d_sae=16, k=3)
    scan = firing_cosines(model, sae, LAYER, HEAD, passages, batch_size=3, null_positions=50, progress=False)
    states, factors = head_states(model, passages, LAYER, HEAD)
    codes = sae.encode(states).detach()
    assert len(scan.firings) == int((codes > 0).sum())
    np.testing.assert_array_equal(scan.alive, (codes > 0).flatten(0, 1).any(0).numpy())
    atoms = iv.atom_matrices(sae, torch.arange(16), 16)
    matrices = states.unflatten(-1, (model.cfg.d_k, model.cfg.d_v)).double()
    previous = torch.cat([torch.zeros_like(matrices[:, :1]), matrices[:, :-1]], 1)
    rows = scan.firings.sample(20, random_state=0)
    b, t, a = (torch.tensor(rows[c].to_numpy()) for c in ("passage", "position", "atom"))
    beta_write = factors["beta"][b, t, None, None] * factors["k"][b, t, :, None] * factors["v"][b, t, None, :]
    np.testing.assert_allclose(rows.cos_beta, frobenius_cosine(atoms[a], beta_write).numpy(), atol=1e-5)
    if name == "qwen35":  # the exact change S_t - a_t S_{t-1} is k delta^T
        change = matrices[b, t] - factors["decay"][b, t].double().exp()[:, None, None] * previous[b, t]
        np.testing.assert_allclose(rows.cos_delta, frobenius_cosine(atoms[a], change).numpy(), atol=1e-5)


def test_mixtures_and_bimodality_equal_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.01, 0.01, 90), rng.normal(0.25, 0.05, 200)])
    fits = mixture_fits(values, n_init=10, seed=7)
    for n in (1, 2, 3):
        direct = GaussianMixture(n_components=n, covariance_type="full", n_init=10, random_state=7)
        direct.fit(values[:, None])
        row = fits.loc[fits.components == n].iloc[0]
        assert row.bic == pytest.approx(direct.bic(values[:, None]), rel=1e-12)
        order = np.argsort(direct.means_[:, 0])
        np.testing.assert_allclose(row.means, direct.means_[order, 0])
        np.testing.assert_allclose(row.weights, direct.weights_[order])
    two = fits.loc[fits.components == 2].iloc[0]
    assert two.means[0] == pytest.approx(0.01, abs=0.01) and two.means[1] == pytest.approx(0.25, abs=0.02)
    # Sarle's coefficient from the bias-corrected moments, written out
    n = values.size
    g = stats.skew(values, bias=False)
    kappa = stats.kurtosis(values, bias=False)
    expected = (g**2 + 1) / (kappa + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    assert bimodality_coefficient(values) == pytest.approx(expected)
    m = values - values.mean()
    g_hand = np.mean(m**3) / np.mean(m**2) ** 1.5 * np.sqrt(n * (n - 1)) / (n - 2)
    assert g == pytest.approx(g_hand)
    with pytest.raises(ValueError, match="at least 4"):
        bimodality_coefficient(values[:3])


def test_classes_and_threshold_table():
    medians = np.array([0.3, 0.049, 0.05, np.nan, -0.01, 0.1, 0.021])
    assert classify(medians).tolist() == ["register", "bundle", "register", "null", "bundle", "register", "bundle"]
    table = threshold_table(medians).set_index("tau")
    assert table.loc[0.02].tolist() == [5, 1, 1]
    assert table.loc[0.05].tolist() == [3, 3, 1]
    assert table.loc[0.10].tolist() == [2, 4, 1]


def test_partition_atoms_end_to_end(qwen35_pair):
    model = qwen35_pair[1]
    passages = torch.randint(0, 90, (4, 40), generator=torch.Generator().manual_seed(3))
    sae = firing_sae(model, passages, LAYER, HEAD, d_sae=24, k=3)
    part = partition_atoms(model, sae, LAYER, HEAD, passages, tau=0.05, n_init=3, progress=False)
    atoms = part.atoms
    assert len(atoms) == 24
    alive = atoms["n_firings"] > 0
    medians = part.firings.groupby("atom")["cos_beta"].median()
    np.testing.assert_allclose(atoms.loc[alive, "median_cos_beta"], medians.loc[atoms.loc[alive, "atom"]])
    assert (atoms.loc[~alive, "class"] == "null").all()
    assert ((atoms.loc[alive, "median_cos"] >= 0.05) == (atoms.loc[alive, "class"] == "register")).all()
    s = part.summary
    assert s["register"] + s["bundle"] + s["null"] == 24 and s["alive"] == int(alive.sum())
    direct = GaussianMixture(2, covariance_type="full", n_init=3, random_state=0).fit(
        atoms.loc[alive, "median_cos"].to_numpy()[:, None])
    assert s["bic_2"] == pytest.approx(direct.bic(atoms.loc[alive, "median_cos"].to_numpy()[:, None]))
    assert s["delta_bic_2_1"] == pytest.approx(s["bic_2"] - s["bic_1"])
    delta = partition_atoms(model, sae, LAYER, HEAD, passages, write_form="delta", n_init=3, progress=False)
    np.testing.assert_allclose(delta.atoms["median_cos"], delta.atoms["median_cos_delta"])
    assert (delta.atoms["class"] == classify(delta.atoms["median_cos_delta"].to_numpy())).all()
    with pytest.raises(ValueError, match="write_form"):
        partition_atoms(model, sae, LAYER, HEAD, passages, write_form="gamma", progress=False)
    with pytest.raises(ValueError, match="atoms must lie"):
        passage_bits_per_token(model, sae, LAYER, HEAD, passages, [24], progress=False)


def synthetic_records(seed=0):
    rng = np.random.default_rng(seed)
    n = 400
    atom = rng.integers(0, 20, n)
    kl_delete = rng.exponential(1.0, n)
    kl_atom = kl_delete * rng.uniform(0.2, 1.3 + atom / 20, n)
    table = {c: np.zeros(n, dtype=np.int64) for c in RECORD_COLUMNS}
    table.update(passage=rng.integers(0, 10, n), position=rng.integers(0, 50, n), atom=atom, feature=atom,
                 kl_atom=kl_atom, kl_delete=kl_delete, kl_random=kl_delete * 2)
    for c in ("coefficient", "native_write_norm", "kl_atom_rev", "kl_delete_rev", "kl_random_rev"):
        table[c] = np.ones(n)
    records = pd.DataFrame(table)
    cosines = np.linspace(-0.1, 0.5, 20)
    atoms = pd.DataFrame({"atom": np.arange(20), "median_cos": cosines, "class": classify(cosines)})
    return records, atoms


def test_class_win_rates_and_mann_whitney_equal_scipy():
    records, atoms = synthetic_records()
    table, test = class_win_rates(records, atoms, min_firings=5)
    win = records.kl_atom < records.kl_delete
    per_atom = win.groupby(records.atom).mean()
    counts = records.atom.value_counts()
    register_atoms = atoms.atom[atoms["class"] == "register"]
    reg = [per_atom[a] for a in register_atoms if counts.get(a, 0) >= 5]
    bun = [per_atom[a] for a in atoms.atom[atoms["class"] == "bundle"] if counts.get(a, 0) >= 5]
    direct = stats.mannwhitneyu(reg, bun, alternative="two-sided")
    assert test["u"] == direct.statistic and test["p"] == direct.pvalue
    row = table.set_index("class").loc["register"]
    assert row.firings == int(records.atom.isin(register_atoms).sum())
    assert row.win_rate == pytest.approx(win[records.atom.isin(register_atoms)].mean())
    assert row.mean_atom_win_rate == pytest.approx(np.mean(reg))


def test_cosine_bins_and_failure_quartiles():
    records, atoms = synthetic_records(1)
    bins = cosine_bin_table(records, atoms, min_firings=1).set_index("bin")
    win = records.kl_atom < records.kl_delete
    cos = atoms.set_index("atom").median_cos[records.atom].to_numpy()
    for label, lo, hi in (("< 0", -np.inf, 0), ("[0, 0.05)", 0, 0.05), ("[0.05, 0.2)", 0.05, 0.2),
                          ("[0.2, 0.3)", 0.2, 0.3), (">= 0.3", 0.3, np.inf)):
        inside = (cos >= lo) & (cos < hi)
        assert bins.loc[label, "firings"] == inside.sum()
        assert bins.loc[label, "win_rate"] == pytest.approx(win[inside].mean())
    quartiles = failure_by_quartile(records).set_index("quartile")
    order = np.argsort(records.kl_delete.to_numpy(), kind="stable")
    for i, label in enumerate(("Q1", "Q2", "Q3", "Q4")):
        chunk = order[i * 100 : (i + 1) * 100]
        assert quartiles.loc[label, "failure_rate"] == pytest.approx(1 - win.to_numpy()[chunk].mean())
    with pytest.raises(ValueError, match="different SAEs"):
        class_win_rates(records.assign(atom=records.atom + 50), atoms)


def test_passage_bits_equal_the_hook_path(family):
    name, model, passages = family
    sae = firing_sae(model, passages, LAYER, HEAD, d_sae=16, k=3)
    registers = [0, 3, 5, 9]
    table = passage_bits_per_token(model, sae, LAYER, HEAD, passages, registers, seed=4, batch_size=3,
                                   progress=False)
    states, factors = head_states(model, passages, LAYER, HEAD)
    fires = (sae.encode(states)[..., registers] > 0).any(-1)
    b, t = fires.nonzero(as_tuple=True)
    cells = torch.stack([b, t, torch.full_like(t, HEAD)], 1)
    assert table.edits.tolist() == torch.bincount(b, minlength=len(passages)).tolist()
    with torch.no_grad():
        native = model(passages, return_type="loss", loss_per_token=True).double().mean(-1)
        deleted = model.run_with_hooks(passages, return_type="loss", loss_per_token=True,
                                       fwd_hooks=iv.delete_write(LAYER, cells)).double().mean(-1)
        # the random writes: Gaussian rank-1 at the native norms, the draws passage_bits makes (per passage seed)
        native_writes = factors["beta"][b, t, None, None] * factors["k"][b, t, :, None] * factors["v"][b, t, None, :]
        random = torch.empty_like(native_writes)
        for p in b.unique().tolist():
            at = (b == p).nonzero().flatten()
            generator = torch.Generator().manual_seed(4 * 1_000_003 + p)
            random[at] = iv.gaussian_rank1(model.cfg.d_k, model.cfg.d_v, native_writes[at].flatten(1).norm(dim=-1),
                                           generator)
        replaced = model.run_with_hooks(passages, return_type="loss", loss_per_token=True,
                                        fwd_hooks=iv.substitute_write(LAYER, cells, random)).double().mean(-1)
    ln2 = np.log(2)
    np.testing.assert_allclose(table.bits_native, native.numpy() / ln2, atol=1e-6)
    np.testing.assert_allclose(table.delta_delete, (deleted - native).numpy() / ln2, atol=1e-6)
    np.testing.assert_allclose(table.delta_random, (replaced - native).numpy() / ln2, atol=1e-6)
    assert (table.delta_random != 0).any()
    summary = summarize_bits(table)
    assert summary["random_worse"] == int((table.delta_random > table.delta_delete).sum())
