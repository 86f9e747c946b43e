"""WriteSAE classes: shapes, sparsity, encoder variants, SAELens base-class machinery."""

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput
from sae_test_data import (
    D_IN,
    D_K,
    D_V,
    ENCODER_VARIANTS,
    VARIANT_IDS,
    low_rank_states,
    make_inference_sae,
    make_training_sae,
    randomize_biases_,
)

import writesae_lens.saes as ws
from writesae_lens.saes import factored, reference

torch.manual_seed(0)

ARCHITECTURES = ["write_topk", "write_jumprelu"]
TRAINING_ARCHITECTURES = ["write_topk", "write_batchtopk", "write_jumprelu"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("_name,encoder_kind,tied,rank", ENCODER_VARIANTS, ids=VARIANT_IDS)
def test_inference_shapes_and_reconstruction(architecture, _name, encoder_kind, tied, rank):
    sae = make_inference_sae(architecture, encoder_kind, tied, rank)
    x = low_rank_states(10).reshape(2, 5, D_IN)  # [batch, pos, d_in]
    acts = sae.encode(x)
    assert acts.shape == (2, 5, sae.cfg.d_sae)
    out = sae.decode(acts)
    assert out.shape == x.shape
    torch.testing.assert_close(sae(x), out)


@pytest.mark.parametrize("architecture", TRAINING_ARCHITECTURES)
@pytest.mark.parametrize("_name,encoder_kind,tied,rank", ENCODER_VARIANTS, ids=VARIANT_IDS)
def test_training_forward_pass_shapes(architecture, _name, encoder_kind, tied, rank):
    sae = make_training_sae(architecture, encoder_kind, tied, rank)
    x = low_rank_states(8)
    step = TrainStepInput(
        sae_in=x,
        coefficients={"l0": 1e-3},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )
    out = sae.training_forward_pass(step)
    assert out.sae_out.shape == x.shape
    assert out.feature_acts.shape == out.hidden_pre.shape == (8, sae.cfg.d_sae)
    out.loss.backward()
    assert all(p.grad is not None for p in sae.parameters())


def test_topk_keeps_at_most_k_per_row():
    sae = make_inference_sae("write_topk", "bilinear", False, 1, k=3)
    randomize_biases_(sae)
    acts = sae.encode(low_rank_states(50))
    assert ((acts != 0).sum(-1) <= 3).all()
    assert (acts >= 0).all()


def test_batchtopk_keeps_at_most_k_times_batch():
    sae = make_training_sae("write_batchtopk", "bilinear", False, 1, k=3)
    randomize_biases_(sae)
    x = low_rank_states(20)
    acts = sae.encode(x)
    assert (acts != 0).sum() <= 3 * 20
    assert ((acts != 0).sum(-1) > 3).any(), "BatchTopK should not cap each row at k"
    torch.testing.assert_close(acts, reference.reference_batch_topk(_hidden_pre(sae, x), 3))


def _hidden_pre(sae, x):
    return (x - sae.b_dec) @ sae.W_enc + sae.b_enc


def test_topk_matches_reference_topk():
    sae = make_inference_sae("write_topk", "bilinear", False, 2, k=4)
    randomize_biases_(sae)
    x = low_rank_states(12)
    torch.testing.assert_close(sae.encode(x), reference.reference_topk(_hidden_pre(sae, x), 4))


@pytest.mark.parametrize("rank", [1, 2])
def test_bilinear_encoder_matches_explicit_einsum(rank):
    sae = make_inference_sae("write_topk", "bilinear", False, rank)
    randomize_biases_(sae)
    x = low_rank_states(7)
    _, cache = sae.run_with_cache(x)
    hidden_pre = cache["hook_sae_acts_pre"]
    states = factored.states_as_matrices(x - sae.b_dec, D_K, D_V)  # encoder sees S - B_dec
    expected = reference.reference_bilinear_preactivations(
        states, sae.W_enc_key, sae.W_enc_value, sae.b_enc
    )
    torch.testing.assert_close(hidden_pre, expected, rtol=1e-5, atol=1e-5)


def test_dense_encoder_is_linear_on_flattened_state():
    sae = make_inference_sae("write_topk", "dense", False, 1)
    randomize_biases_(sae)
    x = low_rank_states(7)
    _, cache = sae.run_with_cache(x)
    expected = (x - sae.b_dec) @ sae.W_enc_dense + sae.b_enc
    torch.testing.assert_close(cache["hook_sae_acts_pre"], expected)
    assert sae.W_enc is sae.W_enc_dense


def test_tied_encoder_uses_decoder_factors():
    sae = make_inference_sae("write_topk", "bilinear", True, 2)
    names = {name for name, _ in sae.named_parameters()}
    assert names == {"W_dec_key", "W_dec_value", "b_enc", "b_dec"}
    assert sae.encoder_key_factors is sae.W_dec_key
    assert sae.encoder_value_factors is sae.W_dec_value
    expected = factored.bilinear_filters(sae.W_dec_key, sae.W_dec_value).T  # [d_in, d_sae]
    torch.testing.assert_close(sae.W_enc, expected)
    # changing a decoder factor changes the encoder
    with torch.no_grad():
        sae.W_dec_key[0].mul_(2.0)
    torch.testing.assert_close(sae.W_enc[:, 0], 2.0 * expected[:, 0])


def test_untied_bilinear_parameter_names_and_shapes():
    sae = make_inference_sae("write_topk", "bilinear", False, 2)
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {
        "W_dec_key": (16, 2, D_K),
        "W_dec_value": (16, 2, D_V),
        "b_dec": (D_IN,),
        "b_enc": (16,),
        "W_enc_key": (16, 2, D_K),
        "W_enc_value": (16, 2, D_V),
    }
    assert sae.W_enc.shape == (D_IN, 16) and sae.W_dec.shape == (16, D_IN)
    assert sae.b_dec_matrix.shape == (D_K, D_V)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("_name,encoder_kind,tied,rank", ENCODER_VARIANTS, ids=VARIANT_IDS)
def test_decode_equals_dense_product_with_W_dec(architecture, _name, encoder_kind, tied, rank):
    sae = make_inference_sae(architecture, encoder_kind, tied, rank)
    randomize_biases_(sae)
    acts = sae.encode(low_rank_states(9))
    torch.testing.assert_close(sae.decode(acts), acts @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-6)


def test_atom_is_key_outer_value():
    """W_dec row i is vec(p_i q_i^T) with p on the key (row) axis."""
    sae = make_inference_sae("write_topk", "bilinear", False, 1)
    atom = sae.W_dec[3].reshape(D_K, D_V)
    torch.testing.assert_close(atom, torch.outer(sae.W_dec_key[3, 0], sae.W_dec_value[3, 0]))


def test_hooks_fire_with_saelens_shapes():
    sae = make_inference_sae("write_topk", "bilinear", False, 1)
    x = low_rank_states(4)
    _, cache = sae.run_with_cache(x)
    assert cache["hook_sae_input"].shape == (4, D_IN)
    assert cache["hook_sae_acts_pre"].shape == (4, 16)
    assert cache["hook_sae_acts_post"].shape == (4, 16)
    assert cache["hook_sae_recons"].shape == (4, D_IN)
    assert cache["hook_sae_output"].shape == (4, D_IN)
    # a hook that zeroes every latent leaves only the decoder bias
    out = sae.run_with_hooks(
        x, fwd_hooks=[("hook_sae_acts_post", lambda acts, hook: torch.zeros_like(acts))]
    )
    torch.testing.assert_close(out, sae.b_dec.expand(4, D_IN))


def test_apply_b_dec_to_input_flag():
    x = low_rank_states(6)
    centred = make_inference_sae("write_topk", "bilinear", False, 1)
    randomize_biases_(centred)
    raw_cfg = ws.WriteTopKSAEConfig(
        d_in=D_IN, d_sae=16, d_k=D_K, d_v=D_V, k=3, apply_b_dec_to_input=False
    )
    raw = ws.WriteTopKSAE(raw_cfg)
    raw.load_state_dict(centred.state_dict())
    _, c1 = centred.run_with_cache(x)
    _, c2 = raw.run_with_cache(x)
    centred_pre = (x - centred.b_dec) @ centred.W_enc + centred.b_enc
    torch.testing.assert_close(c1["hook_sae_acts_pre"], centred_pre)
    torch.testing.assert_close(c2["hook_sae_acts_pre"], x @ raw.W_enc + raw.b_enc)


def test_dtype_and_device_moves():
    sae = make_inference_sae("write_topk", "bilinear", False, 2)
    x = low_rank_states(5)
    out32 = sae(x)
    sae = sae.to(torch.float64)
    assert sae.cfg.dtype == "float64" and sae.W_dec_key.dtype == torch.float64
    assert sae.W_dec.dtype == torch.float64
    torch.testing.assert_close(sae(x.double()).float(), out32, rtol=1e-5, atol=1e-5)
    sae = sae.to("cpu")
    assert sae.cfg.device == "cpu"


UNTIED = [v for v in ENCODER_VARIANTS if not v[2]]


@pytest.mark.parametrize("_name,encoder_kind,tied,rank", UNTIED, ids=[v[0] for v in UNTIED])
def test_fold_activation_norm_scaling_factor_preserves_outputs(_name, encoder_kind, tied, rank):
    sae = make_inference_sae("write_topk", encoder_kind, tied, rank)
    randomize_biases_(sae)
    x = low_rank_states(8)
    scale = 3.5
    expected = sae(x * scale) / scale  # trained on scaled inputs, outputs unscaled
    sae.fold_activation_norm_scaling_factor(scale)
    torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_scaling_refused_for_tied():
    sae = make_inference_sae("write_topk", "bilinear", True, 1)
    with pytest.raises(NotImplementedError, match="tied"):
        sae.fold_activation_norm_scaling_factor(2.0)


def test_fold_whitening_refused():
    sae = make_inference_sae("write_topk", "bilinear", False, 1)
    with pytest.raises(NotImplementedError, match="whitening"):
        sae.fold_activation_whitening(torch.zeros(D_IN), torch.eye(D_IN), torch.eye(D_IN))


@pytest.mark.parametrize("encoder_kind", ["bilinear", "dense"])
def test_jumprelu_fold_W_dec_norm_preserves_outputs(encoder_kind):
    sae = make_inference_sae("write_jumprelu", encoder_kind, False, 2)
    randomize_biases_(sae)
    with torch.no_grad():
        sae.W_dec_key.mul_(torch.rand(16, 1, 1) + 0.5)
    x = low_rank_states(8)
    expected = sae(x)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.atom_norms(), torch.ones(16), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), expected, rtol=1e-5, atol=1e-5)


def test_topk_fold_W_dec_norm_refused():
    sae = make_inference_sae("write_topk", "bilinear", False, 1)
    with pytest.raises(NotImplementedError, match="top-k"):
        sae.fold_W_dec_norm()


def test_jumprelu_threshold_gates_latents():
    sae = make_inference_sae("write_jumprelu", "bilinear", False, 1)
    x = low_rank_states(6)
    hidden_pre = _hidden_pre(sae, x)
    acts = sae.encode(x)
    expected = hidden_pre.relu() * (hidden_pre > sae.threshold)
    torch.testing.assert_close(acts, expected)
