"""Bad input through the Python API: each one is a clear error (its type, and a message naming the bad value and what
is valid), never a silently wrong result. The command line's bad input is in test_bad_inputs_cli.py."""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch
from bad_input_helpers import copy_of_model, write_sae
from safetensors.torch import load_file, save_file

from writesae_lens import interventions, pipeline
from writesae_lens.adapters.qwen35 import HookedQwen35
from writesae_lens.evaluation.firings import check_cell
from writesae_lens.evaluation.substitution import replacement_test
from writesae_lens.hooking.loading import canonical_model_name, resolve_device, resolve_dtype
from writesae_lens.models import load_hooked_model

D_K, D_V = 8, 12  # the non-square test checkpoint's head shape


@pytest.fixture(scope="module")
def model(qwen35_folders):
    """A tiny random Qwen3.5 with non-square heads (d_k 8, d_v 12) and GQA; recurrent layers 0..2, 4 heads."""
    return HookedQwen35.from_pretrained(qwen35_folders["gqa_nonsquare"]).eval()


@pytest.fixture(scope="module")
def tokens(model):
    return torch.randint(0, model.cfg.d_vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def own_sae(model, layer=1, head=2, **kwargs):
    """A WriteSAE recorded for this model, layer and head."""
    return write_sae(D_K, D_V, model_name=model.cfg.model_name, layer=layer, head=head, **kwargs)


# ---------------------------------------------------------------- loading: files, dtypes, devices


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = copy_of_model("qwen35-tiny", tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_hooked_model(folder)


def test_config_that_is_not_json_names_the_file(tmp_path):
    folder = copy_of_model("mamba2-tiny", tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "mamba2", oops')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_hooked_model(folder)


def test_config_that_is_a_json_list_is_refused(tmp_path):
    folder = copy_of_model("mamba2-tiny", tmp_path / "m")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json holds a JSON list"):
        load_hooked_model(folder)


def test_corrupted_weights_name_the_tensor(tmp_path):
    folder = copy_of_model("qwen35-tiny", tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    name = sorted(tensors)[3]
    tensors[name].view(-1)[7] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"tensor '{name}'.*1 non-finite"):
        load_hooked_model(folder)


@pytest.mark.parametrize("name, dtype", [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                                         ("float32", torch.float32)])
def test_dtype_names_are_accepted(name, dtype):
    assert resolve_dtype(name) is dtype


def test_dtype_given_as_a_string_loads_the_model_in_that_dtype():
    model = load_hooked_model("qwen35-tiny", dtype="bfloat16")
    assert model.W_E.dtype == torch.bfloat16


@pytest.mark.parametrize("bad, error", [("float8", ValueError), ("int32", ValueError), (torch.int64, TypeError)])
def test_bad_dtype_names_the_value_and_the_valid_ones(bad, error):
    with pytest.raises(error, match=rf"{bad}.*float32, float16, bfloat16"):
        load_hooked_model("qwen35-tiny", dtype=bad)


def test_device_name_torch_does_not_know():
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device name"):
        load_hooked_model("qwen35-tiny", device="gpu")


def test_device_this_build_or_machine_lacks():
    if torch.cuda.is_available():
        bad, match = f"cuda:{torch.cuda.device_count()}", "does not exist"
    else:
        bad, match = "cuda", "is not available.*available: cpu"
    with pytest.raises(ValueError, match=f"device '{bad}' {match}"):
        resolve_device(bad)


def test_canonical_model_name_is_one_spelling_per_model(tmp_path):
    from writesae_lens.data import pretrained_path

    assert canonical_model_name(pretrained_path("qwen35-tiny")) == "qwen35-tiny"
    assert canonical_model_name("qwen35-tiny") == "qwen35-tiny"
    assert canonical_model_name(str(tmp_path)) == str(tmp_path.resolve())


# ---------------------------------------------------------------- tokens and hooks


@pytest.mark.parametrize("shape", [(0,), (1, 0), (0, 5)])
def test_empty_token_tensor(model, shape):
    shown = shape if len(shape) == 2 else (1, *shape)
    with pytest.raises(ValueError, match=re.escape(f"token tensor is empty (shape {shown})")):
        model(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("point", ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.2.hook_mlp_out",
                                   "blocks.1.mlp.hook_post", "hook_embed"])
def test_hook_returning_a_broadcastable_wrong_shape(model, tokens, point):
    def squash(x, hook):
        return x[:, :1]  # [batch, 1, ...]: broadcasts, silently wrong

    with pytest.raises(ValueError, match=rf"hook on {point} returned a tensor of shape \(2, 1, \d+\) instead of "
                                         rf"\(2, 24, \d+\)"):
        model.run_with_hooks(tokens, fwd_hooks=[(point, squash)])


@pytest.mark.parametrize("point", ["blocks.1.hook_resid_mid", "blocks.1.mlp.hook_pre"])
def test_hook_returning_another_dtype(model, tokens, point):
    with pytest.raises(ValueError, match=rf"hook on {point} returned a tensor of dtype torch.float64 instead of "
                                         "torch.float32"):
        model.run_with_hooks(tokens, fwd_hooks=[(point, lambda x, hook: x.double())])


def test_hook_returning_not_a_tensor(model, tokens):
    with pytest.raises(TypeError, match="hook on blocks.1.hook_resid_pre returned list"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: [1.0])])


def test_hooks_added_with_add_hook_are_checked_too(model, tokens):
    model.add_hook("blocks.0.hook_resid_post", lambda x, hook: x.sum(0))
    try:
        with pytest.raises(ValueError, match=r"blocks.0.hook_resid_post returned a tensor of shape \(24, \d+\)"):
            model(tokens)
    finally:
        model.reset_hooks()
    edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: 2 * x)])
    assert not torch.allclose(edited, model(tokens))  # a correct edit still runs


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_post_read_edit_is_refused(model, tokens, bad):
    matrix = torch.zeros(D_K, D_V)
    matrix[1, 2] = bad
    hooks = interventions.add_to_state(1, [(0, 10, 2)], matrix)
    with pytest.raises(ValueError, match=r"hook_post_read_add returned non-finite edit matrices"):
        model.run_with_hooks(tokens, fwd_hooks=hooks)


def test_a_finite_edit_changes_nothing_before_its_position(model, tokens):
    """Chunked algebra mixes positions within a chunk: positions up to t (after_read) and before t (write) must
    equal the unedited run exactly; later ones must change."""
    native = model(tokens)
    matrix = 5 * torch.randn(D_K, D_V, generator=torch.Generator().manual_seed(1))
    for timing, first_changed in (("after_read", 11), ("write", 10)):
        edited = model.run_with_hooks(tokens, fwd_hooks=interventions.add_to_state(1, [(0, 10, 2)], matrix, timing))
        assert torch.equal(edited[0, :first_changed], native[0, :first_changed]), timing
        assert torch.equal(edited[1], native[1])
        assert not torch.allclose(edited[0, first_changed:], native[0, first_changed:]), timing


# ---------------------------------------------------------------- an SAE used where it does not belong


def test_check_cell_refuses_an_sae_of_another_model(model):
    sae = write_sae(D_K, D_V, model_name="qwen35-tiny", layer=1, head=2)
    with pytest.raises(ValueError, match=r"trained on model 'qwen35-tiny', not on '.*gqa_nonsquare'.*"
                                         "ignore_sae_metadata=True"):
        check_cell(model, sae, 1, 2)
    check_cell(model, sae, 1, 2, ignore_sae_metadata=True)


@pytest.mark.parametrize("layer, head, match", [(0, 2, "trained on 'blocks.1.mixer.hook_state', not on "
                                                       "'blocks.0.mixer.hook_state'"),
                                                (1, 3, "trained on head 2, not on head 3")])
def test_check_cell_refuses_another_hook_or_head(model, layer, head, match):
    with pytest.raises(ValueError, match=match):
        check_cell(model, own_sae(model), layer, head)
    check_cell(model, own_sae(model), layer, head, ignore_sae_metadata=True)


def test_check_cell_refuses_another_state_shape_even_with_the_override(model):
    sae = write_sae(12, 8, model_name=model.cfg.model_name, layer=1, head=2)
    for ignore in (False, True):
        with pytest.raises(ValueError, match=r"\(d_k, d_v\) = \(12, 8\) does not match .* \(8, 12\)"):
            check_cell(model, sae, 1, 2, ignore_sae_metadata=ignore)


def test_check_cell_takes_a_flat_sae_by_its_input_size(model):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    check_cell(model, TopKSAE(TopKSAEConfig(d_in=D_K * D_V, d_sae=8, k=2)), 1, 2)
    with pytest.raises(ValueError, match=r"d_in = 100 does not match .* 8 x 12 = 96"):
        check_cell(model, TopKSAE(TopKSAEConfig(d_in=100, d_sae=8, k=2)), 1, 2)


@pytest.mark.parametrize("layer, head", [(3, 0), (1, 4), (1, -1)])
def test_check_cell_names_a_bad_layer_or_head(model, layer, head):
    with pytest.raises(ValueError, match=f"(layer {layer} is not a recurrent layer.*recurrent layers: \\[0, 1, 2\\])|"
                                         f"(head {head} is out of range.*heads 0..3)"):
        check_cell(model, own_sae(model), layer, head)


def test_replacement_test_refuses_an_sae_of_another_model_unless_told(model, tokens):
    sae = write_sae(D_K, D_V, model_name="mamba2-tiny", layer=1, head=2)
    with pytest.raises(ValueError, match="trained on model 'mamba2-tiny'"):
        replacement_test(model, sae, 1, 2, tokens, progress=False)
    records = replacement_test(model, sae, 1, 2, tokens, progress=False, max_firings=6, ignore_sae_metadata=True)
    assert len(records) == 6


@pytest.mark.parametrize("name, value", [("max_firings", -1), ("max_firings", 0), ("max_firings_per_feature", 0),
                                         ("batch_size", 0), ("passage_batch_size", -2)])
def test_replacement_test_names_a_bad_count(model, tokens, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer.*got {value}"):
        replacement_test(model, own_sae(model), 1, 2, tokens, progress=False, **{name: value})


def test_substitute_atom_refuses_another_head_shape_when_attached(model, tokens):
    sae = write_sae(16, 6, model_name=model.cfg.model_name, layer=1, head=2)
    hooks = interventions.substitute_atom(1, [(0, 5, 2)], sae, [3], coefficients=[1.0])
    with pytest.raises(ValueError, match=r"\(d_k, d_v\) = \(16, 6\) does not match .*\(8, 12\)"):
        model.run_with_hooks(tokens, fwd_hooks=hooks)


def test_amplify_features_refuses_another_head_shape(model, tokens):
    sae = write_sae(6, 16, model_name=model.cfg.model_name, layer=1, head=2)
    with pytest.raises(ValueError, match=r"\(d_k, d_v\) = \(6, 16\) does not match"):
        with model.hooks(fwd_hooks=interventions.amplify_features(1, 2, sae, {0: 1.0})):
            model(tokens)


def test_erase_atom_refuses_another_head_shape(model, tokens):
    sae = write_sae(12, 8, model_name=model.cfg.model_name, layer=1, head=2)
    with pytest.raises(ValueError, match=r"\(d_k, d_v\) = \(12, 8\) does not match"):
        model.run_with_hooks(tokens, fwd_hooks=interventions.erase_atom(1, 2, sae, 0))


@pytest.mark.parametrize("helper", ["substitute_atom", "amplify_features", "erase_atom"])
def test_entry_points_refuse_an_sae_of_another_model(model, tokens, helper):
    sae = write_sae(D_K, D_V, model_name="qwen35-tiny", layer=1, head=2)
    build = {"substitute_atom": lambda **kw: interventions.substitute_atom(1, [(0, 5, 2)], sae, [3], [1.0], **kw),
             "amplify_features": lambda **kw: interventions.amplify_features(1, 2, sae, {3: 1.0}, **kw),
             "erase_atom": lambda **kw: interventions.erase_atom(1, 2, sae, 3, **kw)}[helper]
    with pytest.raises(ValueError, match="trained on model 'qwen35-tiny'.*ignore_sae_metadata"):
        model.run_with_hooks(tokens, fwd_hooks=build())
    edited = model.run_with_hooks(tokens, fwd_hooks=build(ignore_sae_metadata=True))
    assert torch.isfinite(edited).all()


@pytest.mark.parametrize("helper", ["substitute_atom", "amplify_features", "erase_atom"])
def test_entry_points_refuse_an_sae_of_another_head(model, helper):
    sae = own_sae(model, layer=1, head=2)
    build = {"substitute_atom": lambda: interventions.substitute_atom(1, [(0, 5, 1)], sae, [3], [1.0]),
             "amplify_features": lambda: interventions.amplify_features(1, 1, sae, {3: 1.0}),
             "erase_atom": lambda: interventions.erase_atom(1, 1, sae, 3)}[helper]
    with pytest.raises(ValueError, match="trained on head 2, not on head 1"):
        build()


def test_entry_points_refuse_an_sae_of_another_layer(model):
    with pytest.raises(ValueError, match="trained on 'blocks.1.mixer.hook_state', not on 'blocks.2.mixer.hook_state'"):
        interventions.amplify_features(2, 2, own_sae(model), {0: 1.0})


def test_amplify_features_refuses_non_finite_offsets(model):
    with pytest.raises(ValueError, match=r"offsets must be finite.*nan"):
        interventions.amplify_features(1, 2, own_sae(model), {0: float("nan")})


def test_erase_atom_names_an_atom_out_of_range(model):
    with pytest.raises(ValueError, match=r"atoms must be 1 indices in 0..63; got \[64\]"):
        interventions.erase_atom(1, 2, own_sae(model), 64)


# ---------------------------------------------------------------- pipeline settings


@pytest.mark.parametrize("field, value, match", [
    ("training_tokens", 0, "training_tokens must be a positive integer, got 0"),
    ("training_tokens", 1000, "training_tokens = 1000 is less than one batch"),
    ("batch_tokens", 0, "batch_tokens must be a positive integer, got 0"),
    ("batch_tokens", 128 * 17, r"batch_tokens = 2176 is larger than SAELens' activation buffer of 2048"),
    ("k", 65, "k = 65 active atoms cannot exceed the dictionary size d_sae = 64"),
    ("lr", float("nan"), "lr must be a positive finite number, got nan"),
    ("warmup_steps", -1, "warmup_steps must be 0 or more, got -1"),
    ("d_sae", 2.5, "d_sae must be an integer, got 2.5"),
])
def test_train_settings_name_the_bad_value(field, value, match):
    settings = pipeline.TrainSettings(layer=1, head=0, d_sae=64, k=8, context_size=128, training_tokens=4096,
                                      batch_tokens=2048)
    setattr(settings, field, value)
    with pytest.raises(ValueError, match=match):
        pipeline.check_train_settings(settings)


def test_final_token_only_buffer_is_named():
    settings = pipeline.TrainSettings(layer=1, head=0, batch_tokens=64, training_tokens=128, final_token_only=True)
    with pytest.raises(ValueError, match="buffer of 16 states .*with final_token_only.*batch_tokens <= 16"):
        pipeline.check_train_settings(settings)


def test_untrained_sae_is_refused_before_saelens_runs(tmp_path):
    model = load_hooked_model("qwen35-tiny")
    settings = pipeline.TrainSettings(layer=1, head=0, d_sae=64, k=8, training_tokens=0)
    with pytest.raises(ValueError, match="training_tokens must be a positive integer, got 0"):
        pipeline.train_state_sae(model, ["a b c", "d e f"], settings, tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


@pytest.mark.parametrize("n_passages, n_pos, name", [(0, 8, "n_passages"), (-5, 8, "n_passages"), (3, 0, "n_pos")])
def test_token_passages_names_a_bad_count(n_passages, n_pos, name):
    model = load_hooked_model("qwen35-tiny")
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {min(n_passages, n_pos)}"):
        pipeline.token_passages(model, ["some text here"], n_passages, n_pos)


def test_training_restores_signal_handlers_and_writes_no_checkpoints(tmp_path, monkeypatch):
    """SAELens' runner installs SIGINT / SIGTERM handlers of its own; the caller's come back, and no ./checkpoints."""
    monkeypatch.chdir(tmp_path)
    model = load_hooked_model("qwen35-tiny")
    settings = pipeline.TrainSettings(layer=1, head=0, d_sae=32, k=4, context_size=32, training_tokens=512,
                                      batch_tokens=256, warmup_steps=1)

    def mine(signum, frame):
        pass

    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        sae = pipeline.train_state_sae(model, pipeline.load_texts(None)[:20], settings, tmp_path / "sae")
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]["model_name"] == "qwen35-tiny"
    check_cell(model, sae, 1, 0)


def test_rwkv7_checkpoint_errors_name_the_file_and_value(tmp_path):
    import shutil
    from pathlib import Path

    from writesae_lens.adapters.rwkv7 import HookedRWKV7

    folder = shutil.copytree(Path(__file__).parent / "fixtures" / "rwkv7" / "checkpoint", tmp_path / "ckpt")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        HookedRWKV7.from_pretrained(folder, dtype="int8")
    assert HookedRWKV7.from_pretrained(folder, dtype="float64").W_E.dtype == torch.float64
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:64])
    with pytest.raises(ValueError, match=re.escape(f"cannot read {folder / 'model.safetensors'} (64 bytes)")):
        HookedRWKV7.from_pretrained(folder)
