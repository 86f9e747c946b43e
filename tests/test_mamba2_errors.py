"""Bad input to HookedMamba2 gets a clear error that says what was wrong and what is valid."""

import json
import re

import pytest
import torch

from writesae_lens.adapters.mamba2 import HookedMamba2

LAYER = 1


@pytest.fixture(scope="module")
def model(mamba2_pair):
    return mamba2_pair[1]


def test_unknown_hook_name_suggests_close_ones(model):
    with pytest.raises(KeyError, match=r"blocks\.1\.mixer\.hook_write_k"):
        model.run_with_hooks(torch.tensor([[1, 2]]), fwd_hooks=[("blocks.1.mixer.hook_write_key", lambda x, hook: x)])
    with pytest.raises(KeyError, match="unknown hook point"):
        model.add_hook("blocks.3.hook_resid_pre", lambda x, hook: x)  # 3 layers: 0..2
    with pytest.raises(KeyError, match=r"unknown hook point 'blocks\.1\.hook_resid_mid'"):  # no MLP, no resid_mid
        model.run_with_hooks(torch.tensor([[1, 2]]), fwd_hooks=[("blocks.1.hook_resid_mid", lambda x, hook: x)])


def test_hooks_that_change_a_shape(model):
    tokens = torch.tensor([[1, 2, 3, 4]])
    for name in ("hook_write_v", "hook_skip", "hook_gate", "hook_ssm_out"):
        with pytest.raises(ValueError, match=re.escape(name) + " returned .* must keep the shape"):
            model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.{name}", lambda x, hook: x[..., :1])])
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


def test_sparse_edits_of_the_wrong_shape(model):
    cfg = model.cfg
    shape = (1, 4, cfg.n_heads, cfg.d_k, cfg.d_v)
    late = torch.sparse_coo_tensor(torch.tensor([[0], [9], [0]]), torch.ones(1, cfg.d_k, cfg.d_v), (1, 10, *shape[2:]),
                                   check_invariants=True)
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        model.run_with_hooks(torch.tensor([[1, 2, 3, 4]]),
                             fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write_add", lambda x, hook: late)])
    transposed = torch.sparse_coo_tensor(torch.tensor([[0], [1], [0]]), torch.ones(1, cfg.d_v, cfg.d_k),
                                         (1, 4, cfg.n_heads, cfg.d_v, cfg.d_k), check_invariants=True)
    with pytest.raises(ValueError, match=rf"shape \(1, 4, {cfg.n_heads}, {cfg.d_k}, {cfg.d_v}\)"):
        model.run_with_hooks(torch.tensor([[1, 2, 3, 4]]),
                             fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_post_read_add", lambda x, hook: transposed)])




def test_unsupported_checkpoint_type(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"cannot load model_type 'llama'; supported: mamba2"):
        HookedMamba2.from_pretrained(tmp_path / "llama")


def test_qwen_model_is_refused_by_from_hf_model():
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                               linear_num_key_heads=1, linear_num_value_heads=1, linear_key_head_dim=8,
                               linear_value_head_dim=8, layer_types=["linear_attention"])
    with pytest.raises(ValueError, match="supported: mamba2"):
        HookedMamba2.from_hf_model(Qwen3_5ForCausalLM(config))


def test_original_mamba_ssm_config_is_named(tmp_path):
    folder = tmp_path / "mamba_ssm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"d_model": 768, "n_layer": 24, "ssm_cfg": {"layer": "Mamba2"}}))
    with pytest.raises(ValueError, match="no model_type: HookedMamba2 loads transformers-format checkpoints"):
        HookedMamba2.from_pretrained(folder)




def test_checkpoint_with_missing_and_unexpected_keys(mamba2_folders, tmp_path):
    from safetensors.torch import load_file, save_file

    source = mamba2_folders["head_per_group"]
    target = tmp_path / "broken"
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    weights.pop("backbone.layers.0.mixer.D")
    weights["backbone.layers.0.mixer.conv1d.bias"] = torch.zeros(64)  # this config has no conv bias
    weights["backbone.layers.0.mixer.surprise"] = torch.zeros(2)
    save_file(weights, target / "model.safetensors")
    with pytest.raises(ValueError) as err:
        HookedMamba2.from_pretrained(target)
    message = str(err.value)
    assert "blocks.0.mixer.D" in message and "mixer.surprise" in message and "mixer.conv1d.bias" in message


def test_checkpoint_with_wrong_shape(mamba2_folders, tmp_path):
    source = mamba2_folders["head_per_group"]
    target = tmp_path / "reshaped"
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["state_size"] = 20
    (target / "config.json").write_text(json.dumps(config))
    (target / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"shape mismatches: .*in_proj\.weight"):
        HookedMamba2.from_pretrained(target)


def test_inconsistent_config():
    from writesae_lens.adapters.mamba2 import HookedMamba2Config

    class Bad:
        model_type = "mamba2"
        expand, hidden_size, num_heads, head_dim, n_groups = 2, 16, 4, 8, 3

    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of n_groups \(3\)"):
        HookedMamba2Config.from_hf_config(Bad())
