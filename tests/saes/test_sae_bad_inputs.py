"""Bad configurations and bad inputs give errors that say what was wrong and what is valid."""

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput
from sae_test_data import D_IN, D_K, D_V, low_rank_states, make_inference_sae, make_training_sae

import writesae_lens.saes as ws
from writesae_lens.saes import factored


def _cfg(**overrides):
    kwargs = dict(d_in=D_IN, d_sae=16, d_k=D_K, d_v=D_V, k=3) | overrides
    return ws.WriteTopKSAEConfig(**kwargs)


def test_d_in_must_equal_d_k_times_d_v():
    with pytest.raises(ValueError, match=r"d_in must equal d_k \* d_v.*d_in = 25.*4 \* 6 = 24"):
        _cfg(d_in=25)


def test_wrong_factorisation_of_d_in_is_caught():
    with pytest.raises(ValueError, match="d_k \\* d_v"):
        _cfg(d_k=3, d_v=6)  # 18 != 24


def test_k_larger_than_d_sae():
    with pytest.raises(ValueError, match=r"1 <= k <= d_sae = 16, got 17"):
        _cfg(k=17)
    with pytest.raises(ValueError, match="k must be"):
        ws.WriteBatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=16, d_k=D_K, d_v=D_V, k=0)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"encoder_kind": "conv"}, "encoder_kind must be one of"),
        ({"encoder_kind": "dense", "tied": True}, "tied=True .* encoder_kind='bilinear'"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"normalize_activations": "layer_norm"}, "not supported"),
        ({"reshape_activations": "hook_z"}, "reshape_activations must be 'none'"),
        ({"tied": True, "normalize_activations": "expected_average_only_in"}, "tied SAE cannot"),
    ],
    ids=["encoder-kind", "tied-dense", "rank", "layer-norm", "hook-z", "tied-scaling"],
)
def test_invalid_config_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"b_dec_init": "median"}, "b_dec_init must be one of"),
        ({"decoder_renorm_every": -1}, "decoder_renorm_every must be"),
        ({"decoder_init_norm": 0.1}, "decoder_init_norm must be None"),
    ],
    ids=["b-dec-init", "renorm", "decoder-init-norm"],
)
def test_invalid_training_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        ws.WriteTopKTrainingSAEConfig(d_in=D_IN, d_sae=16, d_k=D_K, d_v=D_V, **overrides)


def test_encode_rejects_the_wrong_input_width():
    sae = make_inference_sae("write_topk", "bilinear", False, 1)
    with pytest.raises(ValueError, match=r"d_in = d_k \* d_v = 4 \* 6 = 24.*\(5, 25\)"):
        sae.encode(torch.randn(5, 25))
    # an unflattened [.., d_k, d_v] state is also refused (last axis is d_v, not d_in)
    with pytest.raises(ValueError, match="flattened"):
        sae.encode(torch.randn(5, D_K, D_V))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_encode_rejects_non_finite_states(bad):
    sae = make_inference_sae("write_topk", "bilinear", False, 1)
    x = low_rank_states(4)
    x[2, 5] = bad
    with pytest.raises(ValueError, match="1 non-finite entries"):
        sae.encode(x)


def test_training_rejects_non_finite_states_before_touching_weights():
    sae = make_training_sae("write_topk", "bilinear", False, 1)
    x = low_rank_states(8)
    x[0, 0] = float("nan")
    step = TrainStepInput(
        sae_in=x,
        coefficients={},
        dead_neuron_mask=None,
        n_training_steps=0,
        is_logging_step=False,
    )
    with pytest.raises(ValueError, match="non-finite"):
        sae.training_forward_pass(step)
    assert torch.isfinite(sae.b_dec).all(), "the mean init must not absorb the NaN"


def test_decode_rejects_the_wrong_latent_width():
    sae = make_inference_sae("write_topk", "bilinear", False, 1)
    with pytest.raises(ValueError, match="d_sae = 16"):
        sae.decode(torch.zeros(3, 15))


def test_encoder_factor_properties_need_a_bilinear_encoder():
    sae = make_inference_sae("write_topk", "dense", False, 1)
    with pytest.raises(ValueError, match="encoder_kind='bilinear'"):
        sae.encoder_key_factors


def test_public_tensor_apis_are_shape_checked_when_instrumented():
    """Under the test suite's jaxtyping + beartype hook, mismatched dimensions fail loudly."""
    if not hasattr(factored.decode_active_atoms, "__wrapped__"):
        pytest.skip("writesae_lens is not instrumented by the jaxtyping import hook")
    with pytest.raises(Exception, match="n_active|atom_indices"):
        factored.decode_active_atoms(
            torch.zeros(2, 3),
            torch.zeros(2, 4, dtype=torch.long),  # n_active 4 != 3
            torch.zeros(5, 1, D_K),
            torch.zeros(5, 1, D_V),
        )
