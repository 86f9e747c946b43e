"""WriteSAE training: losses, upkeep between steps, resampling, SAELens' trainer, flat baseline."""

import pytest
import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer
from sae_test_data import D_IN, D_K, D_V, low_rank_states, make_training_sae, randomize_biases_

import writesae_lens.saes as ws
from writesae_lens.saes import factored, resampling


def _step(x, step=0, dead=None, coefficients=None):
    return TrainStepInput(
        sae_in=x,
        coefficients=coefficients or {"l0": 1e-3},
        dead_neuron_mask=dead,
        n_training_steps=step,
        is_logging_step=False,
    )


def _explained_variance(sae, x):
    with torch.no_grad():
        residual = (sae(x) - x).pow(2).sum(-1).mean()
        total = (x - x.mean(0)).pow(2).sum(-1).mean()
    return float(1 - residual / total)


# ---- auxiliary loss --------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["write_topk", "write_batchtopk"])
def test_aux_loss_is_zero_when_nothing_is_dead(architecture):
    sae = make_training_sae(architecture, "bilinear", False, 1)
    x = low_rank_states(16)
    for dead in (None, torch.zeros(16, dtype=torch.bool)):
        out = sae.training_forward_pass(_step(x, dead=dead))
        assert out.losses["auxiliary_reconstruction_loss"].item() == 0.0
        torch.testing.assert_close(out.loss, out.losses["mse_loss"])


def test_aux_loss_is_positive_and_trains_dead_latents():
    torch.manual_seed(0)
    sae = make_training_sae("write_topk", "bilinear", False, 1, aux_k=4)
    x = low_rank_states(16)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[:8] = True
    out = sae.training_forward_pass(_step(x, dead=dead))
    assert out.losses["auxiliary_reconstruction_loss"].item() > 0
    out.losses["auxiliary_reconstruction_loss"].backward()
    assert sae.W_enc_key.grad[:8].abs().sum() > 0  # dead latents receive gradient
    assert sae.W_enc_key.grad[8:].abs().sum() == 0  # live ones do not


def test_full_rank_dense_writesae_reproduces_saelens_topk_losses():
    """A dense-encoder WriteSAE of full rank can hold any flat SAE; then every loss must agree
    with SAELens' TopKTrainingSAE, including the dead-latent auxiliary loss."""
    torch.manual_seed(0)
    d_sae, k = 20, 3
    flat = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=False)
    )
    with torch.no_grad():
        flat.b_dec.normal_(0, 0.3)
        flat.b_enc.normal_(0, 0.1)
    rank = min(D_K, D_V)
    write = ws.WriteTopKTrainingSAE(
        ws.WriteTopKTrainingSAEConfig(
            d_in=D_IN, d_sae=d_sae, d_k=D_K, d_v=D_V, k=k, rank=rank, encoder_kind="dense",
            b_dec_init="zeros", decoder_renorm_every=0,
        )
    )  # fmt: skip
    # each flat decoder row, as a [d_k, d_v] matrix, is U diag(S) V^T: key factors U*S, value V
    u, s, vh = torch.linalg.svd(flat.W_dec.detach().reshape(d_sae, D_K, D_V), full_matrices=False)
    with torch.no_grad():
        write.W_dec_key.copy_((u * s[:, None, :]).transpose(1, 2))
        write.W_dec_value.copy_(vh)
        write.W_enc_dense.copy_(flat.W_enc)
        write.b_enc.copy_(flat.b_enc)
        write.b_dec.copy_(flat.b_dec)
    torch.testing.assert_close(write.W_dec, flat.W_dec, rtol=1e-5, atol=1e-6)
    x = low_rank_states(32)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::3] = True
    out_flat = flat.training_forward_pass(_step(x, dead=dead))
    out_write = write.training_forward_pass(_step(x, dead=dead))
    torch.testing.assert_close(out_write.feature_acts, out_flat.feature_acts)
    torch.testing.assert_close(out_write.sae_out, out_flat.sae_out, rtol=1e-5, atol=1e-5)
    for name in ("mse_loss", "auxiliary_reconstruction_loss"):
        torch.testing.assert_close(out_write.losses[name], out_flat.losses[name], rtol=1e-4, atol=1e-6)


# ---- upkeep between steps ---------------------------------------------------------------------


def test_decoder_renorm_gives_unit_rows():
    sae = make_training_sae("write_topk", "bilinear", False, 2, decoder_renorm_every=1)
    with torch.no_grad():
        sae.W_dec_key.mul_(torch.rand(16, 2, 1) * 3)
        sae.W_dec_value.mul_(torch.rand(16, 2, 1) * 3)
        sae.W_enc_key.mul_(3.0)
    sae.renormalize_decoder_factors_()
    torch.testing.assert_close(sae.W_dec_key.norm(dim=-1), torch.ones(16, 2))
    torch.testing.assert_close(sae.W_dec_value.norm(dim=-1), torch.ones(16, 2))
    torch.testing.assert_close(sae.W_enc_key.norm(dim=-1), 3 * torch.ones(16, 2))  # untouched


def test_renorm_runs_on_the_configured_steps_only():
    sae = make_training_sae("write_topk", "bilinear", False, 1, decoder_renorm_every=5)
    x = low_rank_states(8)
    with torch.no_grad():
        sae.W_dec_key.mul_(2.0)
    sae.training_forward_pass(_step(x, step=3))
    torch.testing.assert_close(sae.W_dec_key.norm(dim=-1), 2 * torch.ones(16, 1))
    sae.training_forward_pass(_step(x, step=5))
    torch.testing.assert_close(sae.W_dec_key.norm(dim=-1), torch.ones(16, 1))


def test_b_dec_starts_at_the_first_batch_mean():
    sae = make_training_sae("write_topk", "bilinear", False, 1)
    x = low_rank_states(64)
    sae.training_forward_pass(_step(x, step=0))
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0))
    with torch.no_grad():
        sae.b_dec.zero_()
    sae.training_forward_pass(_step(x + 5.0, step=1))
    assert not sae.b_dec.any(), "mean init must happen once"


def test_b_dec_zeros_init_is_left_alone():
    sae = make_training_sae("write_topk", "bilinear", False, 1, b_dec_init="zeros")
    sae.training_forward_pass(_step(low_rank_states(16)))
    assert not sae.b_dec.any()


def test_loaded_weights_skip_the_mean_init():
    sae = make_training_sae("write_topk", "bilinear", False, 1)
    state = {name: t.clone() for name, t in sae.state_dict().items()}
    state["b_dec"].fill_(0.25)
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state)
    sae.training_forward_pass(_step(low_rank_states(16)))
    torch.testing.assert_close(sae.b_dec.detach(), torch.full((D_IN,), 0.25))


def test_batchtopk_threshold_tracks_smallest_active_value():
    sae = make_training_sae("write_batchtopk", "bilinear", False, 1, topk_threshold_lr=0.5)
    x = low_rank_states(16)
    out = sae.training_forward_pass(_step(x))
    smallest = out.feature_acts[out.feature_acts > 0].min().double()
    torch.testing.assert_close(sae.topk_threshold, 0.5 * smallest)
    assert "topk_threshold" in out.metrics


def test_jumprelu_l0_loss_and_threshold_gradient():
    sae = make_training_sae("write_jumprelu", "bilinear", False, 1, jumprelu_bandwidth=0.5)
    x = low_rank_states(16)
    out = sae.training_forward_pass(_step(x, coefficients={"l0": 0.1}))
    n_active = (out.feature_acts != 0).sum(-1).float().mean()
    torch.testing.assert_close(out.losses["l0_loss"], 0.1 * n_active)
    out.loss.backward()
    assert sae.threshold.grad is not None and sae.threshold.grad.abs().sum() > 0


def test_jumprelu_threshold_is_projected_non_negative():
    sae = make_training_sae("write_jumprelu", "bilinear", False, 1)
    with torch.no_grad():
        sae.threshold.fill_(-1.0)
    sae.training_forward_pass(_step(low_rank_states(8)))
    assert (sae.threshold >= 0).all()


# ---- resampling --------------------------------------------------------------------------------


def test_draw_states_by_error_follows_errors_and_falls_back_to_uniform():
    gen = torch.Generator().manual_seed(0)
    errors = torch.tensor([0.0, 0.0, 5.0, 0.0])
    assert (resampling.draw_states_by_error(errors, 20, gen) == 2).all()
    uniform = resampling.draw_states_by_error(torch.zeros(4), 400, gen)
    assert set(uniform.tolist()) == {0, 1, 2, 3}
    nan_errors = torch.tensor([float("nan"), 1.0, 1.0, 1.0])
    assert resampling.draw_states_by_error(nan_errors, 5, gen).shape == (5,)


def test_leading_singular_factors_recover_a_rank_one_state():
    key, value = torch.randn(D_K), torch.randn(D_V)
    state = 3.0 * torch.outer(key, value)
    p, q = resampling.leading_singular_factors(state[None], rank=2)
    assert p.shape == (1, 2, D_K) and q.shape == (1, 2, D_V)
    atom = torch.outer(p[0, 0], q[0, 0])
    unit_state = state / state.norm()
    torch.testing.assert_close(atom, unit_state, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p[0].norm(dim=-1), torch.ones(2), rtol=1e-4, atol=1e-5)
    # ranks beyond min(d_k, d_v) are zero
    p_big, _ = resampling.leading_singular_factors(state[None], rank=D_K + 2)
    assert not p_big[0, D_K:].any()


def test_resampled_encoder_norm_is_a_fifth_of_alive_mean():
    assert resampling.resampled_encoder_norm(torch.tensor([1.0, 3.0])) == pytest.approx(0.4)
    assert resampling.resampled_encoder_norm(torch.tensor([])) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "architecture,encoder_kind,tied",
    [
        ("write_topk", "bilinear", False),
        ("write_topk", "bilinear", True),
        ("write_topk", "dense", False),
        ("write_jumprelu", "bilinear", False),
    ],
    ids=["bilinear", "tied", "dense", "jumprelu"],
)
def test_resample_dead_atoms_method(architecture, encoder_kind, tied):
    torch.manual_seed(0)
    sae = make_training_sae(architecture, encoder_kind, tied, 1)
    randomize_biases_(sae)
    x = low_rank_states(32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.training_forward_pass(_step(x)).loss.backward()
    optimizer.step()
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 11]] = True
    before = {name: p.detach().clone() for name, p in sae.named_parameters()}
    targets = sae.resample_dead_atoms_(x, dead, optimizer=optimizer, generator=torch.Generator().manual_seed(1))
    assert targets.tolist() == [2, 5, 11]
    alive = ~dead
    # resampled decoder atoms are unit-norm rank-1 matrices; alive atoms are untouched
    torch.testing.assert_close(sae.atom_norms()[dead], torch.ones(3), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.W_dec_key.detach()[alive], before["W_dec_key"][alive])
    assert (sae.b_enc.detach()[dead] == 0).all()
    # each new atom is the leading singular direction of some batch state as the encoder sees it
    atoms = sae.W_dec.detach()[dead]
    seen = x - sae.b_dec.detach()  # apply_b_dec_to_input is True
    top = [resampling.leading_singular_factors(s.reshape(1, D_K, D_V), 1) for s in seen]
    candidates = torch.stack([torch.outer(p[0, 0], q[0, 0]).flatten() for p, q in top])
    best = (atoms @ candidates.T).abs().max(dim=-1).values
    torch.testing.assert_close(best, torch.ones(3), rtol=1e-4, atol=1e-4)
    if encoder_kind == "bilinear" and not tied:
        alive_norm = factored.atom_frobenius_norms(before["W_enc_key"], before["W_enc_value"])[alive].mean()
        new_norms = factored.atom_frobenius_norms(sae.W_enc_key, sae.W_enc_value)[dead]
        torch.testing.assert_close(new_norms, 0.2 * alive_norm.expand(3), rtol=1e-4, atol=1e-6)
    if architecture == "write_jumprelu":
        torch.testing.assert_close(sae.threshold.detach()[dead], before["threshold"][alive].mean().expand(3))
    # Adam moments of the resampled slices are zeroed, the others kept
    moments = optimizer.state[sae.W_dec_key]
    assert not moments["exp_avg"][dead].any() and not moments["exp_avg_sq"][dead].any()
    assert moments["exp_avg_sq"][alive].any()
    if encoder_kind == "dense":
        assert not optimizer.state[sae.W_enc_dense]["exp_avg"][:, dead].any()


def test_resampled_rank2_filters_get_the_target_norm():
    torch.manual_seed(0)
    sae = make_training_sae("write_topk", "bilinear", False, 2)
    with torch.no_grad():
        sae.W_enc_key.mul_(torch.rand(16, 1, 1) + 0.5)
    x = low_rank_states(32)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[0, 7]] = True
    alive_norm = factored.atom_frobenius_norms(sae.W_enc_key, sae.W_enc_value)[~dead].mean()
    sae.resample_dead_atoms_(x, dead)
    new_norms = factored.atom_frobenius_norms(sae.W_enc_key, sae.W_enc_value)[dead]
    torch.testing.assert_close(new_norms, 0.2 * alive_norm.expand(2), rtol=1e-4, atol=1e-6)
    # decoder factor rows are unit-norm and the two ranks orthogonal (top-2 singular pairs)
    torch.testing.assert_close(sae.W_dec_key[dead].norm(dim=-1), torch.ones(2, 2), rtol=1e-4, atol=1e-5)
    overlap = (sae.W_dec_key[dead, 0] * sae.W_dec_key[dead, 1]).sum(-1)
    torch.testing.assert_close(overlap, torch.zeros(2), rtol=0, atol=1e-5)


def test_resampling_runs_inside_training_when_configured():
    torch.manual_seed(0)
    sae = make_training_sae("write_topk", "bilinear", False, 1, resample_dead_every=10)
    x = low_rank_states(32)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[0] = True
    before = sae.W_dec_key.detach().clone()
    sae.training_forward_pass(_step(x, step=9, dead=dead))
    torch.testing.assert_close(sae.W_dec_key.detach(), before)
    sae.training_forward_pass(_step(x, step=10, dead=dead))
    assert not torch.equal(sae.W_dec_key.detach()[0], before[0])
    torch.testing.assert_close(sae.W_dec_key.detach()[1:], before[1:])


# ---- a short run with SAELens' own trainer, side by side with its flat TopK SAE ---------------


def _train_with_saelens_trainer(sae, states, steps, batch, lr):
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=lr,
        lr_end=lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=10,
        dead_feature_window=50,
        feature_sampling_window=100,
        logger=LoggingConfig(log_to_wandb=False),
    )
    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield states[torch.randint(0, states.shape[0], (batch,), generator=gen)]

    losses = []
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches())
    original_step = trainer._train_step

    def recording_step(sae, sae_in):
        out = original_step(sae=sae, sae_in=sae_in)
        losses.append(out.losses["mse_loss"].item())
        return out

    trainer._train_step = recording_step
    trainer.fit()
    return losses


def test_training_with_saelens_trainer_beside_the_flat_topk_baseline():
    torch.manual_seed(0)
    train, held_out = low_rank_states(2048, seed=1), low_rank_states(256, seed=2)
    d_sae, k, steps, batch = 32, 3, 300, 64
    write = ws.WriteTopKTrainingSAE(
        ws.WriteTopKTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, d_k=D_K, d_v=D_V, k=k)
    )
    flat = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=d_sae, k=k))
    ev_before = _explained_variance(write, held_out)
    write_losses = _train_with_saelens_trainer(write, train, steps, batch, lr=1e-2)
    flat_losses = _train_with_saelens_trainer(flat, train, steps, batch, lr=1e-2)
    ev_write, ev_flat = _explained_variance(write, held_out), _explained_variance(flat, held_out)

    assert len(write_losses) == steps
    early, late = sum(write_losses[:20]) / 20, sum(write_losses[-20:]) / 20
    assert late < 0.3 * early, (early, late)
    assert ev_write > max(ev_before, 0.0) + 0.3 and ev_write > 0.8, (ev_before, ev_write)
    # factors stayed unit-norm (renormalised every step) up to the last optimizer step
    assert (write.W_dec_key.norm(dim=-1) - 1).abs().max() < 0.05
    # the flat baseline learns too; on write-shaped data the WriteSAE is at least as good with
    # far fewer parameters
    assert ev_flat > 0.5, ev_flat
    assert sum(flat_losses[-20:]) < sum(flat_losses[:20])
    assert ev_write > ev_flat - 0.05, (ev_write, ev_flat)
    n_write = sum(p.numel() for p in write.parameters())
    n_flat = sum(p.numel() for p in flat.parameters())
    assert n_write < n_flat / 2
