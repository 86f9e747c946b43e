"""SAELens' architecture tests (tests/saes/test_topk_sae.py, test_batchtopk_sae.py, test_jumprelu_sae.py) rewritten for
WriteSAEs, for rank 1 / 2 and bilinear / dense encoders.

Not ported: the `rescale_acts_by_decoder_norm` tests (a factored dictionary keeps its atoms at unit-norm factors and
does not offer that option; folding decoder norms into a TopK SAE is refused, see test_ported_sae.py) and
`test_topK_activation_sparse_mm` (a torch.sparse.mm check of SAELens' dense W_dec; our decoder densifies a sparse code
and gathers the active atoms, checked below by equal outputs).
"""

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.jumprelu_sae import calculate_pre_act_loss

import writesae_lens.saes as ws
from ported_saes import D_IN, D_SAE, K, shape_kwargs, states, step_input, training_sae

RANKS_ENCODERS = [(1, "bilinear"), (1, "dense"), (2, "bilinear"), (2, "dense")]
IDS = ["r1-bilinear", "r1-dense", "r2-bilinear", "r2-dense"]


# ---- TopK (tests/saes/test_topk_sae.py) ---------------------------------------------------------------------------

def reference_topk_aux_loss(sae, x, sae_out, hidden_pre, dead):
    """The auxiliary loss as EleutherAI's sparsify writes it (without its variance normalisation), with the dense
    atoms: the top k_aux dead pre-activations decode the residual; scaled by min(n_dead / k_aux, 1)."""
    k_aux = D_IN // 2
    n_dead = int(dead.sum())
    scale = min(n_dead / k_aux, 1.0)
    masked = torch.where(dead[None], hidden_pre, -torch.inf)
    values, indices = masked.topk(min(k_aux, n_dead), dim=-1)
    code = torch.zeros_like(hidden_pre).scatter(-1, indices, values)
    recon = code @ sae.W_dec
    return scale * (recon - (x - sae_out).detach()).pow(2).sum(-1).mean()


@pytest.mark.parametrize("rank,encoder", RANKS_ENCODERS, ids=IDS)
def test_topk_aux_loss_matches_the_reference(rank, encoder):
    sae = training_sae(("write_topk", rank, encoder))
    x = states(20)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 4, 5, 9, 12]] = True
    out = sae.training_forward_pass(step_input(x, dead=dead))
    expected = reference_topk_aux_loss(sae, x, out.sae_out, out.hidden_pre, dead)
    torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.calculate_topk_aux_loss(x, out.sae_out, out.hidden_pre, dead), expected,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank,encoder", RANKS_ENCODERS, ids=IDS)
def test_topk_sparse_activations_give_the_same_sae(rank, encoder):
    dense = training_sae(("write_topk", rank, encoder))
    sparse = training_sae(("write_topk", rank, encoder), use_sparse_activations=True)
    sparse.load_state_dict(dense.state_dict())
    x = states(10)
    acts = sparse.encode_with_hidden_pre(x)[0]
    assert acts.is_sparse
    torch.testing.assert_close(acts.to_dense(), dense.encode_with_hidden_pre(x)[0])
    torch.testing.assert_close(sparse.decode(acts), dense.decode(acts.to_dense()))


@pytest.mark.parametrize("rank,encoder", RANKS_ENCODERS, ids=IDS)
def test_topk_training_sae_saves_an_inference_sae_with_the_same_outputs(rank, encoder, tmp_path):
    sae = training_sae(("write_topk", rank, encoder))
    sae.training_forward_pass(step_input(states(16)))
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert isinstance(loaded, ws.WriteTopKSAE) and loaded.cfg.k == K
    x = states(8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x))
        assert (loaded.encode(x) != 0).sum(-1).le(K).all()


# ---- BatchTopK (tests/saes/test_batchtopk_sae.py) -----------------------------------------------------------------

@pytest.mark.parametrize("k", [1.5, 2.0, 2.75])
def test_batchtopk_keeps_int_k_times_n_latents_also_for_fractional_k(k):
    sae = training_sae(("write_batchtopk", 1, "bilinear"), k=k)
    x = states(8)
    acts = sae.encode_with_hidden_pre(x)[0]
    assert int((acts != 0).sum()) == int(k * 8)
    assert bool((acts >= 0).all())


@pytest.mark.parametrize("shape", [(8,), (2, 4), (2, 2, 2)])
def test_batchtopk_activation_counts_every_leading_axis(shape):
    """SAELens: l0 equals k for 2-D, 3-D and 4-D inputs (k per state on average)."""
    sae = training_sae(("write_batchtopk", 2, "dense"), k=2)
    x = states(8).reshape(*shape, D_IN)
    acts = sae.encode_with_hidden_pre(x)[0]
    assert acts.shape == (*shape, D_SAE) and int((acts != 0).sum()) == 2 * 8


def test_batchtopk_config_accepts_a_fractional_k_and_refuses_nonsense():
    assert ws.WriteBatchTopKTrainingSAEConfig(**shape_kwargs(1, "bilinear"), k=0.5).k == 0.5
    for bad in (0, -1.0, D_SAE + 1, True):
        with pytest.raises(ValueError, match="k must be"):
            ws.WriteBatchTopKTrainingSAEConfig(**shape_kwargs(1, "bilinear"), k=bad)
    with pytest.raises(ValueError, match="integer"):
        ws.WriteTopKTrainingSAEConfig(**shape_kwargs(1, "bilinear"), k=1.5)


@pytest.mark.parametrize("rank,encoder", RANKS_ENCODERS, ids=IDS)
def test_batchtopk_training_step_moves_the_threshold_and_saves_it_as_jumprelu(rank, encoder, tmp_path):
    sae = training_sae(("write_batchtopk", rank, encoder))
    x = states(16)
    out = sae.training_forward_pass(step_input(x))
    smallest = out.feature_acts[out.feature_acts > 0].min().double()
    torch.testing.assert_close(sae.topk_threshold, 0.01 * smallest)  # one step of the moving average from 0
    assert "topk_threshold" in out.metrics
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    assert "topk_threshold" not in state
    assert torch.equal(state["threshold"], torch.full((D_SAE,), sae.topk_threshold.item()))
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert isinstance(loaded, ws.WriteJumpReLUSAE)
    torch.testing.assert_close(loaded.threshold, state["threshold"].float())
    assert loaded.cfg.to_dict()["architecture"] == "write_jumprelu"


def test_batchtopk_activation_is_sae_lens_own():
    assert isinstance(training_sae(("write_batchtopk", 1, "bilinear")).activation_fn, BatchTopK)


# ---- JumpReLU (tests/saes/test_jumprelu_sae.py) -------------------------------------------------------------------

@pytest.mark.parametrize("rank,encoder", RANKS_ENCODERS, ids=IDS)
def test_jumprelu_encoding_is_relu_gated_by_the_threshold(rank, encoder):
    sae = training_sae(("write_jumprelu", rank, encoder))
    with torch.no_grad():
        sae.threshold.uniform_(0.0, 0.5)
    acts, hidden_pre = sae.encode_with_hidden_pre(states(12))
    torch.testing.assert_close(acts, hidden_pre * (hidden_pre > sae.threshold))


@pytest.mark.parametrize("rank,encoder", RANKS_ENCODERS, ids=IDS)
def test_jumprelu_training_forward_pass_losses(rank, encoder):
    sae = training_sae(("write_jumprelu", rank, encoder))
    x = states(12)
    out = sae.training_forward_pass(step_input(x, l0=0.5))
    assert set(out.losses) == {"mse_loss", "l0_loss"}
    acts, _ = sae.encode_with_hidden_pre(x)
    torch.testing.assert_close(out.losses["l0_loss"], 0.5 * (acts > 0).float().sum(-1).mean())
    torch.testing.assert_close(out.loss, out.losses["mse_loss"] + out.losses["l0_loss"])


@pytest.mark.parametrize("rank,encoder", RANKS_ENCODERS, ids=IDS)
def test_jumprelu_tanh_sparsity_with_pre_act_loss(rank, encoder):
    sae = training_sae(("write_jumprelu", rank, encoder), jumprelu_sparsity_loss_mode="tanh",
                       pre_act_loss_coefficient=0.1, jumprelu_tanh_scale=4.0)
    x = states(12)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_forward_pass(step_input(x, dead=dead, l0=0.5))
    assert set(out.losses) == {"mse_loss", "l0_loss", "pre_act_loss"}
    norms = sae.atom_norms()
    torch.testing.assert_close(out.losses["l0_loss"], 0.5 * torch.tanh(4.0 * out.feature_acts * norms).sum(-1).mean())
    expected = calculate_pre_act_loss(0.1, sae.threshold, out.hidden_pre, dead, norms)
    torch.testing.assert_close(out.losses["pre_act_loss"], expected)
    assert float(expected) > 0


def test_jumprelu_pre_act_loss_is_zero_without_dead_latents():
    sae = training_sae(("write_jumprelu", 1, "bilinear"), pre_act_loss_coefficient=0.1)
    out = sae.training_forward_pass(step_input(states(6), dead=None))
    assert float(out.losses["pre_act_loss"]) == 0.0


def test_jumprelu_tanh_scale_increases_the_l0_loss():
    x = states(12)
    losses = []
    for scale in (1.0, 8.0):
        sae = training_sae(("write_jumprelu", 2, "dense"), jumprelu_sparsity_loss_mode="tanh",
                           jumprelu_tanh_scale=scale)
        losses.append(float(sae.training_forward_pass(step_input(x, l0=1.0)).losses["l0_loss"]))
    assert losses[1] > losses[0]


def test_jumprelu_quadratic_mode_pulls_towards_target_l0():
    sae = training_sae(("write_jumprelu", 1, "bilinear"), jumprelu_sparsity_loss_mode="quadratic", target_l0=2.0)
    x = states(12)
    out = sae.training_forward_pass(step_input(x, l0=1.0))
    l0 = (out.feature_acts > 0).float().sum(-1)
    torch.testing.assert_close(out.losses["l0_loss"], (2 / 2.0 * (l0 - 2.0) ** 2).mean())


def test_jumprelu_bad_sparsity_settings_are_refused():
    with pytest.raises(ValueError, match="jumprelu_sparsity_loss_mode must be one of"):
        training_sae(("write_jumprelu", 1, "bilinear"), jumprelu_sparsity_loss_mode="l1")
    with pytest.raises(ValueError, match="target_l0"):
        training_sae(("write_jumprelu", 1, "bilinear"), jumprelu_sparsity_loss_mode="quadratic")
    with pytest.raises(ValueError, match="bandwidth"):
        training_sae(("write_jumprelu", 1, "bilinear"), jumprelu_bandwidth=0.0)


def test_jumprelu_keeps_sae_lens_bandwidth_attribute():
    assert training_sae(("write_jumprelu", 1, "bilinear"), jumprelu_bandwidth=0.07).bandwidth == 0.07


@pytest.mark.parametrize("rank,encoder", RANKS_ENCODERS, ids=IDS)
def test_jumprelu_training_sae_saves_an_inference_sae_with_the_same_outputs(rank, encoder, tmp_path):
    sae = training_sae(("write_jumprelu", rank, encoder))
    with torch.no_grad():
        sae.threshold.uniform_(0.0, 0.3)
    sae.training_forward_pass(step_input(states(16)))
    sae.save_inference_model(tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert isinstance(loaded, ws.WriteJumpReLUSAE)
    x = states(8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x))


@pytest.mark.parametrize("config_class", [ws.WriteTopKSAEConfig, ws.WriteTopKTrainingSAEConfig,
                                          ws.WriteBatchTopKTrainingSAEConfig])
def test_rescale_acts_by_decoder_norm_is_not_offered(config_class):
    """In place of SAELens' rescale_acts_by_decoder_norm tests: the option does not exist for factored decoders
    (atoms are kept at unit-norm factors), so asking for it is an error rather than silently ignored."""
    with pytest.raises(TypeError, match="rescale_acts_by_decoder_norm"):
        config_class(**shape_kwargs(1, "bilinear"), k=K, rescale_acts_by_decoder_norm=True)
