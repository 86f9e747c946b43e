"""SAELens' generic SAE tests (tests/saes/test_sae.py and the architecture-independent parts of
tests/saes/test_standard_sae.py), rewritten for WriteSAEs of every architecture, rank and encoder kind.

Not ported, because they are about things a factored dictionary does not have: the `hook_z` reshaping
(`reshape_activations` must be "none": the SAE reads one head's flattened state), whitening folds (a d_in x d_in
map cannot be folded into factors) and the SAEMetadata / from_pretrained tests, which exercise SAELens alone.
"""

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.saes.sae import SAEConfig, TrainingSAEConfig

from ported_saes import D_IN, D_SAE, inference_sae, states, step_input, training_cfg, training_sae


def test_training_config_round_trips_through_dict(variant):
    cfg = training_cfg(variant)
    again = TrainingSAEConfig.from_dict(cfg.to_dict())
    assert type(again) is type(cfg) and again.to_dict() == cfg.to_dict()


def test_inference_config_round_trips_through_dict(variant):
    cfg = SAEConfig.from_dict(training_cfg(variant).get_inference_sae_cfg_dict())
    again = SAEConfig.from_dict(cfg.to_dict())
    assert type(again) is type(cfg) and again.to_dict() == cfg.to_dict()


def test_from_dict_builds_the_registered_class(variant):
    sae = training_sae(variant)
    assert type(TrainingSAE.from_dict(sae.cfg.to_dict())) is type(sae)


def test_encode_decode_shapes_and_error_term_forward(inference_variant):
    """SAELens: encode / decode keep leading axes; with use_error_term the forward pass returns its input."""
    sae = inference_sae(inference_variant)
    x = states(12).reshape(3, 4, D_IN)
    acts = sae.encode(x)
    assert acts.shape == (3, 4, D_SAE)
    assert sae.decode(acts).shape == x.shape
    sae.use_error_term = True
    torch.testing.assert_close(sae(x), x, rtol=1e-5, atol=1e-5)


def test_forward_runs_every_hook(inference_variant):
    sae = inference_sae(inference_variant)
    _, cache = sae.run_with_cache(states(5))
    for name in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output"):
        assert name in cache
    assert cache["hook_sae_acts_post"].shape == (5, D_SAE)


def test_fold_activation_norm_scaling_factor_keeps_outputs(variant):
    """SAELens: an SAE trained on s * x, folded, gives on x what it gave on s * x, divided by s."""
    sae = training_sae(variant, b_dec_init="zeros")
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.2)
        sae.b_enc.normal_(0, 0.1)
    x, s = states(16), 2.5
    with torch.no_grad():
        before = sae(x * s) / s
        sae.fold_activation_norm_scaling_factor(s)
        after = sae(x)
    assert sae.cfg.normalize_activations == "none"
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_fold_W_dec_norm(inference_variant):
    """SAELens: folding decoder norms keeps a JumpReLU SAE's outputs; TopK SAEs refuse, as SAELens' own do without
    rescale_acts_by_decoder_norm (which factored decoders do not offer: atoms are kept at unit-norm factors)."""
    sae = inference_sae(inference_variant)
    with torch.no_grad():
        sae.W_dec_key.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None, None])
    x = states(16)
    if inference_variant[0] == "write_topk":
        with pytest.raises(NotImplementedError, match="top-k"):
            sae.fold_W_dec_norm()
        return
    with torch.no_grad():
        before = sae(x)
        sae.fold_W_dec_norm()
        after = sae(x)
    torch.testing.assert_close(sae.atom_norms(), torch.ones(D_SAE), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_training_sae_saves_and_loads_from_checkpoint(variant, tmp_path):
    """SAELens: save_model, then load_from_disk, gives the same SAE; and load_weights_from_checkpoint restores it."""
    sae = training_sae(variant)
    sae.training_forward_pass(step_input(states(16)))  # the first-batch mean init of b_dec
    sae.save_model(tmp_path / "ckpt")
    loaded = TrainingSAE.load_from_disk(tmp_path / "ckpt")
    assert type(loaded) is type(sae)
    for name, tensor in sae.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    fresh = training_sae(variant, seed=9)
    fresh.load_weights_from_checkpoint(tmp_path / "ckpt")
    x = states(8)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(x), sae.encode(x))
    with pytest.raises(FileExistsError):
        sae.save_model(tmp_path / "ckpt")  # a folder the user named is never overwritten silently


def test_inference_save_loads_as_the_inference_class(variant, tmp_path):
    sae = training_sae(variant)
    sae.training_forward_pass(step_input(states(16)))
    sae.save_inference_model(tmp_path / "inference")
    loaded = SAE.load_from_disk(tmp_path / "inference")
    expected = "write_jumprelu" if variant[0] != "write_topk" else "write_topk"
    assert loaded.cfg.architecture() == expected
    if variant[0] != "write_batchtopk":  # BatchTopK's training encode is batch-relative; inference uses thresholds
        x = states(8)
        with torch.no_grad():
            torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)))


def test_training_forward_pass_output_looks_reasonable(variant):
    sae = training_sae(variant)
    x = states(16)
    out = sae.training_forward_pass(step_input(x, dead=torch.zeros(D_SAE, dtype=torch.bool)))
    assert out.sae_out.shape == x.shape and out.feature_acts.shape == (16, D_SAE)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.losses["mse_loss"], (out.sae_out - x).pow(2).sum(-1).mean())
    out.loss.backward()
    assert all(p.grad is not None for p in sae.parameters())
