"""Comparing partitions (paper-method §5.1): the KS statistic and p against scipy, the cluster bootstrap's size under
clustered nulls, Holm against its step-down definition, atom cosines against materialised matrices, seed matching on
a permuted dictionary, and ``writesae partition-compare`` end to end on two seeds of a WriteSAE on the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

import writesae_lens.saes as ws
from writesae_lens.cli import main
from writesae_lens.evaluation.partition_compare import (atom_cosines, best_matches, class_count_stability,
                                                        cluster_bootstrap_ks, compare_firing_cosines, holm,
                                                        ks_statistic, seed_matches)

D_K, D_V = 3, 5  # non-square, so a key/value mix-up shows


def test_ks_statistic_equals_scipy():
    rng = np.random.default_rng(0)
    for n_a, n_b, shift in ((40, 70, 0.0), (200, 50, 0.3), (15, 15, 1.0)):
        a, b = rng.normal(size=n_a), rng.normal(shift, size=n_b)
        b[:5] = a[:5]  # ties across the samples
        assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)


def test_cluster_bootstrap_with_singleton_clusters_agrees_with_scipy():
    """With one observation per cluster the bootstrap null is the pooled-sample null of the ordinary KS test, so its
    p-value is close to scipy's."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=150), rng.normal(0.25, size=150)
    result = cluster_bootstrap_ks(a, np.arange(150), b, np.arange(150), n_resamples=2000, seed=2)
    assert result["d"] == pytest.approx(stats.ks_2samp(a, b).statistic)
    assert result["p_ks"] == pytest.approx(stats.ks_2samp(a, b).pvalue)
    assert 0.01 < result["p_ks"] < 0.5
    assert result["p_cluster"] == pytest.approx(result["p_ks"], abs=0.04)
    assert result["clusters_a"] == result["clusters_b"] == 150


def _clustered_sample(rng, n_clusters=12, size=25):
    """Firings of ``n_clusters`` atoms whose cosines share a per-atom centre: strongly dependent within an atom."""
    centres = rng.normal(size=n_clusters)
    values = np.repeat(centres, size) + 0.05 * rng.normal(size=n_clusters * size)
    return values, np.repeat(np.arange(n_clusters), size)


def test_cluster_bootstrap_holds_its_size_where_scipy_does_not():
    """Both groups draw their atoms from one population: scipy's test (firings as independent) rejects most of the
    time, the cluster bootstrap about at its level."""
    rng = np.random.default_rng(3)
    scipy_rejects = cluster_rejects = 0
    trials = 30
    for _ in range(trials):
        a, ca = _clustered_sample(rng)
        b, cb = _clustered_sample(rng)
        result = cluster_bootstrap_ks(a, ca, b, cb, n_resamples=199, seed=rng)
        scipy_rejects += result["p_ks"] < 0.05
        cluster_rejects += result["p_cluster"] < 0.05
    assert scipy_rejects >= trials // 2
    assert cluster_rejects <= 5  # about 5 % of 30 expected; 5 or more is improbable at the nominal level
    # and a real difference between atom populations is still found
    a, ca = _clustered_sample(rng, n_clusters=30)
    b, cb = _clustered_sample(rng, n_clusters=30)
    assert cluster_bootstrap_ks(a, ca, b + 2.0, cb, n_resamples=199, seed=0)["p_cluster"] == pytest.approx(1 / 200)


def _holm_by_definition(p):
    p = np.asarray(p, np.float64)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def test_holm_against_its_definition():
    p = [0.01, 0.04, 0.03, 0.005]
    adjusted, reject = holm(p, alpha=0.05)
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(adjusted, _holm_by_definition(p))
    assert reject.tolist() == [True, False, False, True]
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.2, size=9)
    np.testing.assert_allclose(holm(p)[0], _holm_by_definition(p))


def test_compare_firing_cosines_table_and_bad_input():
    rng = np.random.default_rng(4)
    groups = {}
    for label, shift in (("a", 0.0), ("b", 0.0), ("c", 3.0)):
        values, clusters = _clustered_sample(rng, n_clusters=20, size=10)
        groups[label] = pd.DataFrame({"atom": clusters, "cos_beta": values + shift})
    table = compare_firing_cosines(groups, n_resamples=199, seed=0, progress=False)
    assert list(zip(table.group_a, table.group_b)) == [("a", "b"), ("a", "c"), ("b", "c")]
    np.testing.assert_allclose(table["p_holm"], _holm_by_definition(table["p_cluster"]))
    assert table.set_index(["group_a", "group_b"]).loc[("a", "c"), "reject"]
    for pair in (("a", "b"), ("b", "c")):
        row = table.set_index(["group_a", "group_b"]).loc[pair]
        assert row["d"] == pytest.approx(stats.ks_2samp(groups[pair[0]].cos_beta, groups[pair[1]].cos_beta).statistic)
    only_one = compare_firing_cosines(groups, contrasts=[("c", "a")], n_resamples=50, progress=False)
    assert len(only_one) == 1 and only_one.p_holm[0] == only_one.p_cluster[0]
    with pytest.raises(ValueError, match="at least two groups"):
        compare_firing_cosines({"a": groups["a"]})
    with pytest.raises(ValueError, match="must name two different groups"):
        compare_firing_cosines(groups, contrasts=[("a", "z")])
    with pytest.raises(ValueError, match="lacks"):
        compare_firing_cosines(groups, column="cos_delta")
    with pytest.raises(ValueError, match="non-finite"):
        cluster_bootstrap_ks([np.nan, 1.0], [0, 1], [1.0], [0])


def test_class_count_stability():
    atoms = {f"seed{i}": pd.DataFrame({"class": ["register"] * r + ["bundle"] * b + ["null"] * n})
             for i, (r, b, n) in enumerate(((10, 4, 2), (12, 3, 1), (11, 5, 0)))}
    counts, stability = class_count_stability(atoms)
    assert counts["register"].tolist() == [10, 12, 11]
    row = stability.set_index("class").loc["register"]
    assert row["mean"] == 11 and row["std"] == pytest.approx(np.std([10, 12, 11], ddof=1))
    assert row["cv"] == pytest.approx(np.std([10, 12, 11], ddof=1) / 11)


def _write_sae(d_sae: int, rank: int, seed: int):
    config = ws.WriteTopKSAEConfig(k=2, d_in=D_K * D_V, d_sae=d_sae, d_k=D_K, d_v=D_V, rank=rank)
    sae = ws.WriteTopKSAE(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_dec_key.copy_(torch.randn(sae.W_dec_key.shape, generator=generator))
        sae.W_dec_value.copy_(torch.randn(sae.W_dec_value.shape, generator=generator))
    return sae


@pytest.mark.parametrize("rank", [1, 2])
def test_atom_cosines_equal_the_materialised_matrices(rank):
    a, b = _write_sae(6, rank, 0), _write_sae(4, rank, 1)
    matrices = [torch.einsum("nrk,nrv->nkv", s.W_dec_key.double(), s.W_dec_value.double()).flatten(1) for s in (a, b)]
    expected = torch.nn.functional.normalize(matrices[0], dim=1) @ torch.nn.functional.normalize(matrices[1], dim=1).T
    got = atom_cosines(a.W_dec_key, a.W_dec_value, b.W_dec_key, b.W_dec_value)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_seed_matching_finds_a_permuted_dictionary():
    """Seed b is seed a's atoms in another order, rescaled, some with both factors' signs flipped, and a little
    noise; two atoms are replaced by random ones. Every other atom is matched to its original."""
    a = _write_sae(8, 1, 0)
    b = _write_sae(8, 1, 5)
    permutation = torch.tensor([3, 0, 7, 1, 6, 2, 4, 5])
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        sign = torch.tensor([1.0, -1, 1, -1, 1, 1, -1, 1])[:, None, None]
        b.W_dec_key.copy_(2.0 * sign * a.W_dec_key[permutation] + 1e-3 * torch.randn(8, 1, D_K, generator=generator))
        b.W_dec_value.copy_(sign * a.W_dec_value[permutation])
        fresh = _write_sae(8, 1, 11)
        b.W_dec_key[:2] = fresh.W_dec_key[:2]  # b's atoms 0 and 1 (a's atoms 3 and 0) are lost
        b.W_dec_value[:2] = fresh.W_dec_value[:2]
    table = best_matches(a, b)
    kept = [atom for atom in range(8) if atom not in (3, 0)]
    inverse = torch.argsort(permutation).numpy()
    assert (table.loc[kept, "best_match"].to_numpy() == inverse[kept]).all()
    assert (table.loc[kept, "best_cos"] > 0.999).all() and (table.loc[kept, "assigned_cos"] > 0.999).all()
    matches = seed_matches({"a": a, "b": b}, threshold=0.9, progress=False)
    row = matches.set_index("run").loc["a"]
    assert row["matched_one_to_one"] == pytest.approx(6 / 8)
    assert row["matched"] >= 6 / 8
    alive = {"a": np.array([True] * 4 + [False] * 4), "b": np.ones(8, bool)}
    subset = seed_matches({"a": a, "b": b}, alive=alive, progress=False).set_index("run")
    assert subset.loc["a", "atoms"] == 4
    with pytest.raises(ValueError, match="different shapes"):
        best_matches(a, ws.WriteTopKSAE(ws.WriteTopKSAEConfig(k=2, d_in=D_V * D_K, d_sae=4, d_k=D_V, d_v=D_K)))
    with pytest.raises(ValueError, match="at least two"):
        seed_matches({"a": a})


@pytest.mark.usefixtures("one_thread")
def test_partition_compare_command(tmp_path, capsys):
    """Two seeds of a small WriteSAE on the shipped model, each partitioned by `writesae partition`, then compared."""
    from sae_checks import firing_sae
    from writesae_lens import pipeline
    from writesae_lens.models import load_hooked_model

    model = load_hooked_model("qwen35-tiny")
    _, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
    passages = pipeline.token_passages(model, eval_docs, 6, 64)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        firing_sae(model, passages, 1, 0, d_sae=32, k=4).save_model(tmp_path / f"sae{seed}")
        out = tmp_path / f"partition{seed}"
        assert main(["partition", "--model", "qwen35-tiny", "--layer", "1", "--head", "0", "--sae",
                     str(tmp_path / f"sae{seed}"), "--passages", "6", "--passage-len", "64", "--bits-passages", "0",
                     "--n-init", "2", "--out", str(out)]) == 0
        runs.append(f"s{seed}={out}")
    out = tmp_path / "compare"
    assert main(["partition-compare", "--runs", *runs, "--seeds", "--n-resamples", "99", "--out", str(out)]) == 0
    tests = pd.read_csv(out / "ks_tests.csv")
    assert len(tests) == 1 and 0 < tests.p_cluster[0] <= 1 and tests.p_holm[0] == tests.p_cluster[0]
    firings = [pd.read_csv(tmp_path / f"partition{seed}" / "firings.csv") for seed in (0, 1)]
    assert tests.d[0] == pytest.approx(stats.ks_2samp(firings[0].cos_beta, firings[1].cos_beta).statistic)
    matches = pd.read_csv(out / "seed_matches.csv")
    assert sorted(matches.run) == ["s0", "s1"] and matches.matched.between(0, 1).all()
    assert (out / "cosine_ecdfs.png").read_bytes().startswith(b"\x89PNG")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ks_tests"][0]["group_a"] == "s0"
    assert "Holm" in capsys.readouterr().out
    # bad input: a clear error (exit 2), nothing written
    for args, message in ((["--runs", runs[0]], "at least two runs"),
                          (["--runs", runs[0], "x"], "LABEL=FOLDER"),
                          (["--runs", runs[0], f"s0={tmp_path}"], "twice"),
                          (["--runs", runs[0], f"t={tmp_path}"], "not a `writesae partition` output folder"),
                          (["--runs", *runs, "--contrasts", "s0:zz"], "two labels of --runs")):
        bad = tmp_path / "bad"
        assert main(["partition-compare", *args, "--out", str(bad)]) == 2
        assert message in capsys.readouterr().err
        assert not bad.exists()


def test_read_partition_keeps_the_null_class(tmp_path):
    """A dead atom's class is the string "null", which pandas would read as NaN (and count the atom as alive)."""
    from writesae_lens.commands.partition_compare import _alive_mask, read_partition

    atoms = pd.DataFrame({"atom": [0, 1, 2], "n_firings": [3, 0, 5], "median_cos": [0.2, np.nan, 0.01],
                          "class": ["register", "null", "bundle"]})
    atoms.to_csv(tmp_path / "atoms.csv", index=False)
    pd.DataFrame({"atom": [0, 2], "cos_beta": [0.2, 0.01]}).to_csv(tmp_path / "firings.csv", index=False)
    (tmp_path / "summary.json").write_text("{}")
    run = read_partition(tmp_path)
    assert run["atoms"]["class"].tolist() == ["register", "null", "bundle"]
    assert np.isnan(run["atoms"]["median_cos"][1])
    assert _alive_mask(run["atoms"]).tolist() == [True, False, True]
    counts, _ = class_count_stability({"a": run["atoms"]})
    assert counts.loc[0, "null"] == 1
