"""Gradients through a WriteSAE equal those of the same SAE written as dense matrices.

The dense twin computes `hidden_pre = (x - b_dec) @ W_enc + b_enc`, SAELens' activation, and
`acts @ W_dec + b_dec`, with W_enc / W_dec materialised from the very same factor parameters, so
autograd through the twin gives the reference gradient for every parameter and for the input.
Both decode paths (gathered active atoms, materialised atoms) are forced in turn; neither may
change any gradient (issue #20, point 1). JumpReLU's threshold gradient is also compared with
SAELens' own JumpReLUTrainingSAE holding the same weights.
"""

import pytest
import torch
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.jumprelu_sae import JumpReLU, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopK

from sae_test_data import D_IN, low_rank_states, make_inference_sae, make_training_sae, randomize_biases_
from writesae_lens.saes import factored

PATHS = {"sparse": 1e9, "dense": 0.0}  # max_active_fraction forcing each decode path
VARIANTS = [("bilinear", False, 1), ("bilinear", False, 2), ("bilinear", True, 1), ("dense", False, 1),
            ("dense", False, 2)]
VARIANT_IDS = ["bilinear-r1", "bilinear-r2", "tied-r1", "dense-r1", "dense-r2"]


def dense_twin(sae, x, activation):
    """The SAE as dense matrices: every gradient of this is the reference."""
    sae_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    W_enc = sae.encoder_weight().T  # [d_in, d_sae], from the same factors
    W_dec = factored.materialize_atoms(sae.W_dec_key, sae.W_dec_value).flatten(1, 2)  # [d_sae, d_in]
    hidden_pre = sae_in @ W_enc + sae.b_enc
    acts = activation(hidden_pre)
    return acts @ W_dec + sae.b_dec, acts


def grads_of(sae, x, run):
    sae.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out, acts = run(x)
    upstream = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)
    ((out * upstream).sum() + (acts * 0.1).pow(2).sum()).backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()
    return out.detach(), grads


def assert_same_grads(left, right):
    assert left[0].shape == right[0].shape
    torch.testing.assert_close(left[0], right[0], rtol=1e-9, atol=1e-10)
    assert set(left[1]) == set(right[1])
    for name in left[1]:
        torch.testing.assert_close(left[1][name], right[1][name], rtol=1e-9, atol=1e-10, msg=name)


def activation_of(sae):
    arch = sae.cfg.architecture()
    if arch == "write_topk":
        return TopK(sae.cfg.k)
    if arch == "write_batchtopk":
        return BatchTopK(sae.cfg.k)
    return lambda z: JumpReLU.apply(z, sae.threshold, 0.05, False)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("architecture", ["write_topk", "write_batchtopk", "write_jumprelu"])
def test_encode_decode_gradients_equal_the_dense_twin(architecture, variant, path, monkeypatch):
    encoder_kind, tied, rank = variant
    torch.manual_seed(0)
    extra = {"jumprelu_bandwidth": 0.05} if architecture == "write_jumprelu" else {}
    sae = make_training_sae(architecture, encoder_kind, tied, rank, dtype="float64", **extra)
    randomize_biases_(sae)
    if architecture == "write_jumprelu":
        with torch.no_grad():
            sae.threshold.uniform_(0.0, 0.4)
    x = low_rank_states(12).double()
    monkeypatch.setattr(factored, "SPARSE_DECODE_MAX_ACTIVE_FRACTION", PATHS[path])

    def through_sae(x):
        acts, _ = sae.encode_with_hidden_pre(x)
        return sae.decode(acts), acts

    assert_same_grads(grads_of(sae, x, through_sae), grads_of(sae, x, lambda x: dense_twin(sae, x, activation_of(sae))))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_decode_gives_every_latent_its_gradient(variant, path, monkeypatch):
    """d out / d code_i = <G, A_i> for inactive latents too, on both paths."""
    encoder_kind, tied, rank = variant
    sae = make_inference_sae("write_topk", encoder_kind, tied, rank, dtype="float64")
    monkeypatch.setattr(factored, "SPARSE_DECODE_MAX_ACTIVE_FRACTION", PATHS[path])
    code = torch.zeros(5, sae.cfg.d_sae, dtype=torch.float64)
    code[:, 2] = 1.5
    code[1:, 7] = -0.5
    code[4] = 0.0  # an all-zero row
    code.requires_grad_()
    upstream = torch.randn(5, D_IN, dtype=torch.float64)
    (sae.decode(code) * upstream).sum().backward()
    expected = upstream @ sae.W_dec.detach().T
    torch.testing.assert_close(code.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("ste_to_input", [False, True])
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_jumprelu_threshold_gradient_matches_sae_lens(variant, ste_to_input, path, monkeypatch):
    """The full training loss (MSE + step L0) of a WriteSAE and of SAELens' JumpReLUTrainingSAE holding the
    materialised weights give the same threshold gradient, latents just below threshold included."""
    encoder_kind, tied, rank = variant
    torch.manual_seed(1)
    kwargs = dict(jumprelu_bandwidth=0.2, jumprelu_ste_to_input=ste_to_input, l0_coefficient=0.3,
                  dtype="float64", b_dec_init="zeros", decoder_renorm_every=0)
    ours = make_training_sae("write_jumprelu", encoder_kind, tied, rank, **kwargs)
    randomize_biases_(ours)
    x = low_rank_states(16).double()
    with torch.no_grad():
        hidden_pre = ours.encode_with_hidden_pre(x)[1]
        ours.threshold.copy_(hidden_pre.quantile(0.8, dim=0).clamp(min=0.01) + 0.0123)  # between data points
    theirs = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D_IN, d_sae=ours.cfg.d_sae, jumprelu_bandwidth=0.2, jumprelu_ste_to_input=ste_to_input,
        l0_coefficient=0.3, dtype="float64"))
    with torch.no_grad():
        theirs.W_enc.copy_(ours.W_enc)
        theirs.W_dec.copy_(ours.W_dec)
        theirs.b_enc.copy_(ours.b_enc)
        theirs.b_dec.copy_(ours.b_dec)
        theirs.threshold.data = ours.threshold.detach().clone().float()
    monkeypatch.setattr(factored, "SPARSE_DECODE_MAX_ACTIVE_FRACTION", PATHS[path])
    thresholds = []
    for sae in (ours, theirs):
        sae.zero_grad(set_to_none=True)
        step = TrainStepInput(sae_in=x, coefficients={"l0": 0.3}, dead_neuron_mask=None, n_training_steps=1,
                             is_logging_step=False)
        sae.training_forward_pass(step).loss.backward()
        thresholds.append(sae.threshold.grad.double())
    near = ((hidden_pre - ours.threshold.detach()).abs() < 0.1).any(0)
    assert near.sum() > 3  # the comparison covers latents on both sides of their threshold
    torch.testing.assert_close(thresholds[0], thresholds[1], rtol=1e-5, atol=1e-6)
