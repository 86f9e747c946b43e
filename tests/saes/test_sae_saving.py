"""Saving and loading WriteSAEs through SAELens: registry, load_from_disk, atomic folders."""

import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer
from sae_test_data import (
    ENCODER_VARIANTS,
    VARIANT_IDS,
    low_rank_states,
    make_inference_sae,
    make_training_sae,
    randomize_biases_,
)

import writesae_lens.saes as ws
from writesae_lens.saes import registration
from writesae_lens.saes.saving import write_folder_atomically


def test_architectures_are_registered_under_their_names():
    assert get_sae_class("write_topk") == (ws.WriteTopKSAE, ws.WriteTopKSAEConfig)
    assert get_sae_class("write_jumprelu") == (ws.WriteJumpReLUSAE, ws.WriteJumpReLUSAEConfig)
    assert get_sae_training_class("write_topk")[0] is ws.WriteTopKTrainingSAE
    assert get_sae_training_class("write_batchtopk")[0] is ws.WriteBatchTopKTrainingSAE
    assert get_sae_training_class("write_jumprelu")[0] is ws.WriteJumpReLUTrainingSAE


def test_registering_again_is_harmless_and_foreign_names_are_refused():
    ws.register_write_saes()
    ws.register_write_saes()
    registry: dict = {"write_topk": (SAE, ws.WriteTopKSAEConfig)}
    with pytest.raises(ValueError, match="already registered"):
        registration._register_once(
            registry, None, "write_topk", (ws.WriteTopKSAE, ws.WriteTopKSAEConfig)
        )


def test_reimporting_the_package_does_not_raise():
    import importlib

    importlib.reload(registration)
    registration.register_write_saes()


def test_a_reloaded_class_replaces_its_older_self():
    older = type("WriteTopKSAE", (), {"__module__": ws.WriteTopKSAE.__module__})
    older.__qualname__ = ws.WriteTopKSAE.__qualname__
    registry: dict = {"write_topk": (older, ws.WriteTopKSAEConfig)}
    registration._register_once(
        registry, None, "write_topk", (ws.WriteTopKSAE, ws.WriteTopKSAEConfig)
    )
    assert registry["write_topk"][0] is ws.WriteTopKSAE


@pytest.mark.parametrize("architecture", ["write_topk", "write_jumprelu"])
@pytest.mark.parametrize("_name,encoder_kind,tied,rank", ENCODER_VARIANTS, ids=VARIANT_IDS)
def test_save_then_load_from_disk_is_bit_identical(
    tmp_path, architecture, _name, encoder_kind, tied, rank
):
    sae = make_inference_sae(architecture, encoder_kind, tied, rank)
    randomize_biases_(sae)
    sae.cfg.metadata.hook_name = "blocks.1.mixer.hook_state"
    sae.cfg.metadata.hook_head_index = 2
    x = low_rank_states(12)
    weights_path, cfg_path = sae.save_model(tmp_path / "sae")
    assert weights_path == tmp_path / "sae" / "sae_weights.safetensors" and weights_path.exists()
    assert json.loads(cfg_path.read_text())["architecture"] == architecture
    loaded = SAE.load_from_disk(tmp_path / "sae")
    assert type(loaded) is type(sae)
    assert loaded.cfg.d_k == sae.cfg.d_k and loaded.cfg.encoder_kind == encoder_kind
    assert loaded.cfg.metadata.hook_head_index == 2
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))


def test_from_dict_round_trip():
    sae = make_inference_sae("write_topk", "bilinear", False, 2)
    rebuilt = SAE.from_dict(sae.cfg.to_dict())
    assert type(rebuilt) is ws.WriteTopKSAE
    assert rebuilt.cfg == sae.cfg
    training = make_training_sae("write_batchtopk", "dense", False, 1, aux_k=7)
    rebuilt_training = TrainingSAE.from_dict(training.cfg.to_dict())
    assert type(rebuilt_training) is ws.WriteBatchTopKTrainingSAE
    assert rebuilt_training.cfg.aux_k == 7 and rebuilt_training.cfg.encoder_kind == "dense"


@pytest.mark.parametrize("architecture", ["write_topk", "write_jumprelu"])
def test_training_sae_saves_as_its_inference_architecture(tmp_path, architecture):
    sae = make_training_sae(architecture, "bilinear", False, 1)
    randomize_biases_(sae)
    x = low_rank_states(10)
    sae.save_inference_model(tmp_path / "inference")
    loaded = SAE.load_from_disk(tmp_path / "inference")
    assert loaded.cfg.architecture() == architecture
    assert torch.equal(loaded(x), sae(x))


def test_batchtopk_saves_as_jumprelu_with_the_running_threshold(tmp_path):
    sae = make_training_sae("write_batchtopk", "bilinear", False, 1, k=3)
    x = low_rank_states(64)
    sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    sae.save_inference_model(tmp_path / "inference")
    loaded = SAE.load_from_disk(tmp_path / "inference")
    assert type(loaded) is ws.WriteJumpReLUSAE
    torch.testing.assert_close(loaded.threshold, torch.full((16,), float(sae.topk_threshold)))
    # same pre-activations, now gated by the fixed threshold instead of the batch
    _, cache = loaded.run_with_cache(x)
    hidden_pre = cache["hook_sae_acts_pre"]
    expected = hidden_pre.relu() * (hidden_pre > sae.topk_threshold.float())
    torch.testing.assert_close(loaded.encode(x), expected)


def test_training_checkpoint_round_trip_with_training_sae_loader(tmp_path):
    sae = make_training_sae("write_batchtopk", "bilinear", True, 2)
    randomize_biases_(sae)
    sae.topk_threshold.fill_(0.125)
    sae.save_model(tmp_path / "ckpt")
    loaded = TrainingSAE.load_from_disk(tmp_path / "ckpt")
    assert type(loaded) is ws.WriteBatchTopKTrainingSAE
    assert float(loaded.topk_threshold) == 0.125
    x = low_rank_states(10)
    assert torch.equal(loaded(x), sae(x))


# ---- atomic folders ------------------------------------------------------------------------------


def test_save_refuses_a_non_empty_folder_unless_asked(tmp_path):
    sae = make_inference_sae("write_topk", "bilinear", False, 1)
    target = tmp_path / "sae"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        sae.save_model(target)
    assert (target / "notes.txt").read_text() == "keep me"
    sae.save_model(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["sae"], "no temporary folder left behind"


def test_save_into_an_existing_empty_folder_works(tmp_path):
    target = tmp_path / "made_by_the_runner"
    target.mkdir()
    make_inference_sae("write_topk", "bilinear", False, 1).save_model(target)
    assert (target / "cfg.json").exists()


def test_failed_write_leaves_no_folder(tmp_path):
    def explode(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"12")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder_atomically(tmp_path / "sae", explode)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder(tmp_path):
    target = tmp_path / "sae"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def explode(folder: Path) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_folder_atomically(target, explode, overwrite=True)
    assert (target / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


def test_save_to_a_file_path_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        make_inference_sae("write_topk", "bilinear", False, 1).save_model(tmp_path / "file")


def test_saelens_trainer_checkpoints_write_saes(tmp_path):
    """SAETrainer creates the checkpoint folder, then calls save_model and adds its own files."""
    sae = make_training_sae("write_topk", "bilinear", False, 1)
    states = low_rank_states(64)
    cfg = SAETrainerConfig(
        total_training_samples=4 * 16,
        train_batch_size_samples=16,
        checkpoint_path=str(tmp_path / "checkpoints"),
        save_final_checkpoint=True,
        lr_end=3e-5,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(states.split(16)))
    trainer.fit()
    final = tmp_path / "checkpoints" / "final_64"
    names = sorted(p.name for p in final.iterdir())
    assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"} <= set(names)
    loaded = TrainingSAE.load_from_disk(final)
    assert torch.equal(loaded(states), sae(states))
