"""Bad input gets a clear error that says what was wrong and what is valid."""

import json

import pytest
import torch

from writesae_lens.adapters.qwen35 import HookedQwen35

LAYER = 1


@pytest.fixture(scope="module")
def model(qwen35_pair):
    return qwen35_pair[1]


def test_unknown_hook_name_suggests_close_ones(model):
    with pytest.raises(KeyError, match=r"blocks\.1\.mixer\.hook_write_k"):
        model.run_with_hooks(torch.tensor([[1, 2]]), fwd_hooks=[("blocks.1.mixer.hook_write_key", lambda x, hook: x)])
    with pytest.raises(KeyError, match="unknown hook point"):
        model.add_hook("blocks.99.hook_resid_pre", lambda x, hook: x)
    with pytest.raises(KeyError, match="unknown hook point"):  # attention layers have no mixer hooks
        model.run_with_hooks(torch.tensor([[1, 2]]), fwd_hooks=[("blocks.3.mixer.hook_state", lambda x, hook: x)])


def test_token_dtype_rank_and_range(model):
    with pytest.raises(TypeError, match="integer dtype"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 101\)"):
        model(torch.tensor([[1, 101]]))
    # Under the test run's beartype hook the annotation rejects these first; without it the library's own check does.
    with pytest.raises(TypeError, match="string, a list of strings or a token tensor|Type-check error"):
        model(3.0)
    with pytest.raises((ValueError, TypeError), match="return_type"):
        model(torch.tensor([[1, 2]]), return_type="probs")
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(torch.tensor([[1, 2]]), stop_at_layer=9)
    with pytest.raises(ValueError, match="no tokenizer"):
        model.to_tokens("hello")


def sparse_at(batch, pos, head, shape):
    index = torch.tensor([[batch], [pos], [head]])
    return torch.sparse_coo_tensor(index, torch.ones(1, *shape[3:]), shape)


def test_edit_position_and_head_out_of_range(model):
    tokens = torch.tensor([[1, 2, 3, 4]])
    cfg = model.cfg
    hook = f"blocks.{LAYER}.mixer.hook_write_add"
    bad_head = lambda x, hook: torch.sparse_coo_tensor(  # noqa: E731
        torch.tensor([[0], [1], [cfg.n_heads]]), torch.ones(1, cfg.d_k, cfg.d_v), (1, 4, cfg.n_heads + 1, cfg.d_k, cfg.d_v))
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        model.run_with_hooks(tokens, fwd_hooks=[(hook, bad_head)])
    with pytest.raises(IndexError):
        model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda x, hook: x + sparse_at(0, 9, 0, (1, 4, 4, 8, 12)))])
    wrong_shape = lambda x, hook: x[:, :2]  # noqa: E731
    with pytest.raises(ValueError, match=r"hook_write_v returned .* must keep the shape"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write_v", wrong_shape)])
    with pytest.raises(ValueError, match="non-finite"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_write_beta",
                                                 lambda x, hook: x * float("nan"))])


def test_unsupported_checkpoint_type(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"cannot load model_type 'llama'; supported: qwen3_5_text, qwen3_5"):
        HookedQwen35.from_pretrained(tmp_path / "llama")




def test_checkpoint_with_missing_and_unexpected_keys(qwen35_folders, tmp_path):
    from safetensors.torch import load_file, save_file

    source = qwen35_folders["recurrent_only"]
    target = tmp_path / "broken"
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    weights = load_file(source / "model.safetensors")
    weights.pop("model.layers.0.linear_attn.A_log")
    weights["model.layers.0.linear_attn.surprise"] = torch.zeros(2)
    save_file(weights, target / "model.safetensors")
    with pytest.raises(ValueError) as err:
        HookedQwen35.from_pretrained(target)
    assert "blocks.0.mixer.A_log" in str(err.value) and "linear_attn.surprise" in str(err.value)


def test_checkpoint_with_wrong_shape(qwen35_folders, tmp_path):
    source = qwen35_folders["recurrent_only"]
    target = tmp_path / "reshaped"
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["linear_value_head_dim"] = 11
    (target / "config.json").write_text(json.dumps(config))
    (target / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="shape mismatches"):
        HookedQwen35.from_pretrained(target)


def test_jaxtyping_shapes_are_checked_in_the_test_run():
    """The test run installs jaxtyping's import hook with beartype (pyproject addopts): shape mismatches raise."""
    from writesae_lens.ops.gated_delta import recurrence_reference

    q = torch.zeros(1, 3, 2, 4)
    with pytest.raises(Exception, match="(?i)type-check|shape|dim"):
        recurrence_reference(q, torch.zeros(1, 3, 2, 5), torch.zeros(1, 3, 2, 6), torch.zeros(1, 3, 2))
