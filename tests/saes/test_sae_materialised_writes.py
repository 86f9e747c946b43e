"""Writes into a WriteSAE's materialised W_dec / W_enc are refused loudly, never silently lost (issue #20, point 2)."""

import copy

import pytest
import torch
from sae_lens.synthetic import init_sae_to_match_feature_dict

from sae_test_data import D_IN, D_K, D_V, low_rank_states, make_inference_sae
from writesae_lens.saes.materialised import MaterialisedWriteError


@pytest.fixture
def sae():
    torch.manual_seed(0)
    return make_inference_sae("write_topk", "bilinear", False, 1)


def test_write_through_data_of_a_temporary_is_refused_at_next_use(sae):
    sae.W_dec.data[:5] = 0
    with pytest.raises(MaterialisedWriteError, match="W_dec_key .* and W_dec_value"):
        sae(low_rank_states(3))
    sae(low_rank_states(3))  # refused once; the SAE is usable again, unchanged


@pytest.mark.parametrize("use", ["encode", "decode", "W_dec", "state_dict", "save"])
def test_every_use_checks(sae, use, tmp_path):
    held = sae.W_dec
    with torch.no_grad():
        held[2] += 1.0
    with pytest.raises(MaterialisedWriteError):
        {"encode": lambda: sae.encode(low_rank_states(2)),
         "decode": lambda: sae.decode(torch.zeros(2, sae.cfg.d_sae)),
         "W_dec": lambda: sae.W_dec,
         "state_dict": lambda: sae.state_dict(),
         "save": lambda: sae.save_model(tmp_path / "sae")}[use]()


def test_bilinear_W_enc_writes_are_refused_dense_ones_take_effect():
    torch.manual_seed(0)
    bilinear = make_inference_sae("write_topk", "bilinear", False, 1)
    bilinear.W_enc.data[:, 0] = 3.0
    with pytest.raises(MaterialisedWriteError, match="W_enc_key"):
        bilinear.encode(low_rank_states(2))
    dense = make_inference_sae("write_topk", "dense", False, 1)
    dense.W_enc.data[:, 0] = 0.0
    assert not dense.W_enc_dense[:, 0].any()


def test_reassigning_data_and_attributes(sae):
    sae.W_dec.data = torch.zeros(sae.cfg.d_sae, D_IN)
    with pytest.raises(MaterialisedWriteError):
        sae.decode(torch.zeros(1, sae.cfg.d_sae))
    with pytest.raises(AttributeError, match="set_atoms_"):
        sae.W_dec = torch.zeros(sae.cfg.d_sae, D_IN)
    with pytest.raises((AttributeError, KeyError)):
        sae.W_dec = torch.nn.Parameter(torch.zeros(sae.cfg.d_sae, D_IN))


def test_reading_without_writing_never_raises_and_keeps_gradients(sae):
    first = sae.W_dec
    second = sae.W_dec
    assert first.requires_grad and torch.equal(first, second)
    first.norm().backward()  # differentiable; backward does not write into it
    assert sae.W_dec_key.grad is not None
    sae.encode(low_rank_states(2))


def test_sae_with_handed_out_tensors_still_deep_copies(sae):
    """The ledger lives outside the module (SAELens SAEs hold lambdas, so pickling is not offered either way)."""
    _ = sae.W_dec
    clone = copy.deepcopy(sae)
    torch.testing.assert_close(clone.W_dec, sae.W_dec)


def test_sae_lens_init_to_match_feature_dict_is_refused_naming_the_factors(sae):
    """SAELens' synthetic-data initialiser writes W_enc then W_dec through .data: the factored SAE says so."""
    features = torch.randn(8, D_IN)
    with pytest.raises(MaterialisedWriteError, match="Edit the factors"):
        init_sae_to_match_feature_dict(sae, type("FD", (), {"feature_vectors": features})())
        sae.encode(low_rank_states(1))


@pytest.mark.parametrize("rank", [1, 2])
def test_set_atoms_writes_low_rank_atoms_into_the_factors(rank):
    torch.manual_seed(0)
    sae = make_inference_sae("write_topk", "bilinear", False, rank, dtype="float64")
    p, q = torch.randn(3, rank, D_K, dtype=torch.float64), torch.randn(3, rank, D_V, dtype=torch.float64)
    atoms = torch.einsum("nrk,nrv->nkv", p, q).reshape(3, D_IN)
    sae.set_atoms_([1, 4, 5], atoms)
    torch.testing.assert_close(sae.W_dec[[1, 4, 5]], atoms)
    sae.set_atoms_(0, torch.zeros(D_IN))
    assert not sae.W_dec[0].any()
    with pytest.raises(ValueError, match=f"rank above {rank}"):
        sae.set_atoms_(2, torch.randn(D_IN, dtype=torch.float64))
