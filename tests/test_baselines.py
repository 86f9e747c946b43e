"""The flat+SVD and rank-2 baselines of the substitution test (``evaluation.baselines``): the SVD of an exactly rank-1
flat atom reproduces it, a rank-1 flat SAE gives the records of the equivalent WriteSAE, the reconstruction variant and
the rank-2 control equal the hook path, and the flat SAE is SAELens' own "topk" trained by its runner."""

import numpy as np
import pytest
import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

import writesae_lens.saes as ws
from sae_checks import firing_sae
from substitution_checks import assert_records_match_hook_path, hook_path_kls
from writesae_lens import interventions as iv
from writesae_lens import pipeline
from writesae_lens.evaluation.baselines import (
    SVDAtoms,
    compare_substitution,
    flat_svd_test,
    rank1_part,
    substitution_row,
    top1_svd,
)
from writesae_lens.evaluation.firings import head_states
from writesae_lens.evaluation.substitution import replacement_test

LAYER, HEAD, D_SAE, K = 1, 2, 24, 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(qwen35_pair):
    return qwen35_pair[1]


@pytest.fixture(scope="module")
def passages():
    return torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(8))


def rank1_flat_and_write_sae(model, passages):
    """A flat TopK SAE (SAELens' class) whose decoder rows are exactly rank-1 atoms p q^T, and the dense-encoder
    WriteSAE with the same encoder, bias and atoms."""
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    g = torch.Generator().manual_seed(2)
    p, q = torch.randn(D_SAE, d_k, generator=g), torch.randn(D_SAE, d_v, generator=g)
    p, q = p / p.norm(dim=-1, keepdim=True), q / q.norm(dim=-1, keepdim=True)
    encoder = torch.randn(d_k * d_v, D_SAE, generator=g) / (d_k * d_v) ** 0.5
    states, _ = head_states(model, passages, LAYER, HEAD)
    mean = states.flatten(0, 1).mean(0)
    flat = TopKSAE(TopKSAEConfig(d_in=d_k * d_v, d_sae=D_SAE, k=K))
    write = ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=d_k * d_v, d_sae=D_SAE, d_k=d_k, d_v=d_v, k=K,
                                                  encoder_kind="dense"))
    with torch.no_grad():
        flat.W_enc.copy_(encoder)
        flat.W_dec.copy_((p[:, :, None] * q[:, None, :]).flatten(1))
        flat.b_enc.zero_()
        flat.b_dec.copy_(mean)
        write.W_enc_dense.copy_(encoder)
        write.b_enc.zero_()
        write.b_dec.copy_(mean)
        write.W_dec_key.copy_(p[:, None])
        write.W_dec_value.copy_(q[:, None])
    return flat, write


def test_top1_svd_of_a_rank1_matrix_reproduces_it():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(6, 5, generator=g), torch.randn(6, 7, generator=g)
    atoms = p[:, :, None] * q[:, None, :]
    torch.testing.assert_close(rank1_part(atoms), atoms, atol=1e-5, rtol=1e-5)
    s, u, v = top1_svd(atoms)
    torch.testing.assert_close(s, p.norm(dim=-1) * q.norm(dim=-1), atol=1e-5, rtol=1e-5)
    full = torch.randn(4, 5, 7, generator=g)  # the best rank-1 approximation of a full-rank matrix (Eckart-Young)
    u_np, s_np, vh_np = np.linalg.svd(full.double().numpy())
    np.testing.assert_allclose(rank1_part(full).numpy(), s_np[:, :1, None] * u_np[:, :, :1] * vh_np[:, :1, :],
                               atol=1e-5)


def test_a_rank1_flat_sae_gives_the_equivalent_writesae_records(model, passages):
    flat, write = rank1_flat_and_write_sae(model, passages)
    svd = SVDAtoms(flat, model.cfg.d_k, model.cfg.d_v)
    atoms = iv.atom_matrices(svd, torch.arange(D_SAE), D_SAE)
    torch.testing.assert_close(atoms.flatten(1), flat.W_dec.detach(), atol=1e-5, rtol=1e-5)  # the atoms themselves
    options = dict(max_firings_per_feature=3, max_firings=20, batch_size=11, progress=False)
    got = flat_svd_test(model, flat, LAYER, HEAD, passages, variant="atom", **options)
    expected = replacement_test(model, write, LAYER, HEAD, passages, amplitude="native_norm", **options)
    assert len(got) == len(expected) >= 12
    for column in ("passage", "position", "feature", "atom", "top1_atom", "top1_delete"):
        assert (got[column] == expected[column]).all(), column
    for column in ("coefficient", "native_write_norm", "kl_atom", "kl_delete", "kl_random"):
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-4, atol=1e-7)


def test_the_reconstruction_variant_equals_the_hook_path(model, passages):
    torch.manual_seed(5)
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    flat = TopKSAE(TopKSAEConfig(d_in=d_k * d_v, d_sae=D_SAE, k=K))  # full-rank random atoms
    states, factors = head_states(model, passages, LAYER, HEAD)
    with torch.no_grad():
        flat.b_dec.copy_(states.flatten(0, 1).mean(0))
    records = flat_svd_test(model, flat, LAYER, HEAD, passages, max_firings=15, progress=False)
    assert len(records) >= 10
    cells, matrices, reads = [], [], []
    for row in records.drop_duplicates(["passage", "position"]).itertuples():
        p, t = row.passage, row.position
        recon = flat.decode(flat.encode(states[p, t])).detach().reshape(d_k, d_v)
        u, s, vh = np.linalg.svd(recon.double().numpy())
        top = torch.tensor(s[0] * np.outer(u[:, 0], vh[0]), dtype=torch.float32)
        native = factors["beta"][p, t] * torch.outer(factors["k"][p, t], factors["v"][p, t])
        cells.append((p, t, HEAD))
        matrices.append(top * native.norm() / top.norm() - native)
        reads.append(t + 1)
    got = hook_path_kls(model, LAYER, passages, cells, torch.stack(matrices), "after_read", reads)
    expected = records.drop_duplicates(["passage", "position"])
    np.testing.assert_allclose([a for a, _ in got], expected.kl_atom, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(expected.coefficient, [float(flat.encode(states[p, t]).detach().max())
                                                      for p, t in zip(expected.passage, expected.position)], rtol=1e-5)
    with pytest.raises(ValueError, match="amplitude"):
        flat_svd_test(model, flat, LAYER, HEAD, passages, amplitude="natural")
    with pytest.raises(ValueError, match="variant"):
        flat_svd_test(model, flat, LAYER, HEAD, passages, variant="pca")


def test_the_rank2_control_equals_the_hook_path(model, passages):
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    torch.manual_seed(3)
    sae = ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=d_k * d_v, d_sae=D_SAE, d_k=d_k, d_v=d_v, k=K, rank=2))
    states, _ = head_states(model, passages, LAYER, HEAD)
    with torch.no_grad():
        sae.b_dec.copy_(states.flatten(0, 1).mean(0))
    assert sae.W_dec_key.shape == (D_SAE, 2, d_k)
    records = replacement_test(model, sae, LAYER, HEAD, passages, max_firings=15, progress=False)
    assert assert_records_match_hook_path(model, sae, LAYER, HEAD, passages, records, "after_read", "next") >= 20


def test_compare_substitution_table(model, passages):
    sae = firing_sae(model, passages, LAYER, HEAD)
    a = replacement_test(model, sae, LAYER, HEAD, passages, max_firings=15, progress=False)
    b = replacement_test(model, sae, LAYER, HEAD, passages, max_firings=15, amplitude="native_norm", progress=False)
    table = compare_substitution({"writesae": a, "native_norm": b}).set_index("substitute")
    win = (b.kl_atom < b.kl_delete).mean()
    assert table.loc["native_norm", "win_rate"] == pytest.approx(win)
    difference = 100 * ((a.kl_atom < a.kl_delete).mean() - win)
    assert table.loc["native_norm", "reference_minus_pp"] == pytest.approx(difference)
    assert table.loc["writesae", "median_kl_delete"] == pytest.approx(np.median(a.kl_delete))
    chain = ((a.kl_atom < a.kl_delete) & (a.kl_delete < a.kl_random)).mean()
    assert substitution_row("x", a)["strict_chain"] == pytest.approx(chain)


def test_flat_and_rank2_saes_trained_by_the_saelens_runner(tmp_path):
    from writesae_lens.models import load_hooked_model

    model = load_hooked_model("qwen35-tiny")
    documents = pipeline.load_texts(None)[:40]
    settings = pipeline.TrainSettings(layer=1, head=0, d_sae=32, k=4, context_size=32, training_tokens=32 * 8 * 6,
                                      batch_tokens=256, lr=3e-3, warmup_steps=2)
    flat = pipeline.train_flat_sae(model, documents, settings, tmp_path / "flat")
    assert type(flat).__name__.startswith("TopK") and flat.cfg.architecture() == "topk"
    assert (flat.cfg.metadata.hook_name, flat.cfg.metadata.hook_head_index) == ("blocks.1.mixer.hook_state", 0)
    assert flat.W_dec.shape == (32, model.cfg.d_k * model.cfg.d_v)
    rank2 = pipeline.train_state_sae(model, documents, pipeline.TrainSettings(**{**settings.__dict__, "rank": 2}),
                                     tmp_path / "rank2")
    assert rank2.cfg.rank == 2 and rank2.W_dec_key.shape == (32, 2, model.cfg.d_k)
