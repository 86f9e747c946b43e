"""SAELens' trainer tests (tests/training/test_sae_trainer.py) and its synthetic-data initialisation test
(tests/synthetic/test_initialization.py), rewritten for WriteSAEs of every architecture, rank and encoder kind.

The runner tests (tests/test_llm_sae_training_runner.py) are mirrored on the shipped Qwen3.5 model in
tests/test_sae_lens_training.py (training, saving, loading, evals, repeated runs, metadata).
"""

import pytest
import torch
from sae_lens import TrainingSAE
from sae_lens.config import SAETrainerConfig
from sae_lens.synthetic import init_sae_to_match_feature_dict
from sae_lens.training.sae_trainer import SAETrainer

from ported_saes import D_IN, D_SAE, states, training_sae
from writesae_lens.saes.materialised import MaterialisedWriteError


def batches(batch: int = 16):
    seed = 0
    while True:
        seed += 1
        yield states(batch, seed=seed)


def trainer_for(sae, steps: int = 6, **cfg):
    config = SAETrainerConfig(total_training_samples=16 * steps, train_batch_size_samples=16, lr=3e-3, lr_end=3e-3,
                              dead_feature_window=2, feature_sampling_window=4, **cfg)
    return SAETrainer(cfg=config, sae=sae, data_provider=batches())


def test_train_step_reduces_loss_on_the_same_states(variant):
    sae = training_sae(variant)
    trainer = trainer_for(sae)
    x = states(16)
    losses = []
    for _ in range(6):
        losses.append(float(trainer.step(x).loss))
        trainer.n_training_steps += 1
    assert losses[-1] < losses[0]


def test_train_step_output_and_sparsity_bookkeeping(variant):
    sae = training_sae(variant)
    trainer = trainer_for(sae)
    out = trainer.step(states(16))
    assert out.sae_out.shape == (16, D_IN) and out.feature_acts.shape == (16, D_SAE)
    fired = (out.feature_acts > 0).sum(0)
    torch.testing.assert_close(trainer.act_freq_scores, fired.float())
    assert trainer.n_frac_active_samples == 16
    assert bool((trainer.n_forward_passes_since_fired[fired > 0] == 0).all())


def test_fit_trains_saves_a_checkpoint_and_restores_it(variant, tmp_path):
    sae = training_sae(variant)
    trainer = trainer_for(sae, checkpoint_path=str(tmp_path / "ckpt"), save_final_checkpoint=True)
    trained = trainer.fit()
    final = tmp_path / "ckpt" / f"final_{16 * 6}"
    assert (final / "cfg.json").exists()
    restored = TrainingSAE.load_from_disk(final)
    x = states(8)
    with torch.no_grad():
        torch.testing.assert_close(restored.decode(restored.encode_with_hidden_pre(x)[0]),
                                   trained.decode(trained.encode_with_hidden_pre(x)[0]))
    # a second fit into the same checkpoint folders replaces them, as SAELens does with its own SAEs
    trainer_for(training_sae(variant, seed=3), checkpoint_path=str(tmp_path / "ckpt"), save_final_checkpoint=True).fit()

    fresh = trainer_for(training_sae(variant, seed=5))
    fresh.load_trainer_state(final)
    assert fresh.n_training_samples == 16 * 6


def test_sae_lens_feature_dict_initialisation_is_refused_with_the_factors_named(variant):
    """SAELens writes the true features into W_enc and W_dec through .data; a factored dictionary cannot take an
    arbitrary d_in-vector as an atom, so the write must fail loudly (never be lost silently)."""
    sae = training_sae(variant)
    features = type("FeatureDictionary", (), {"feature_vectors": torch.randn(6, D_IN)})()
    with pytest.raises(MaterialisedWriteError, match="Edit the factors"):
        init_sae_to_match_feature_dict(sae, features)
        sae.encode_with_hidden_pre(states(2))
