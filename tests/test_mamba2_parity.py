"""HookedMamba2 against transformers' Mamba2ForCausalLM on tiny random checkpoints (fp32)."""

import pytest
import torch
from transformers import Mamba2ForCausalLM

from closeness import relative_error
from mamba2_factory import CONFIGS, build_checkpoint_with_tokenizer
from writesae_lens.adapters.mamba2 import HookedMamba2


TOL = 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_residuals_match_transformers(mamba2_folders, name):
    folder = mamba2_folders[name]
    hf = Mamba2ForCausalLM.from_pretrained(folder).eval()
    model = HookedMamba2.from_pretrained(folder).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 150), generator=torch.Generator().manual_seed(1))  # 2.3 chunks
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True, use_cache=False)
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert relative_error(logits, ref.logits) < TOL
    # transformers' hidden_states[l] is the output of layer l (no embedding entry); the last entry is final-normed
    for layer in range(model.cfg.n_layers):
        assert relative_error(cache[f"blocks.{layer}.hook_resid_post"], ref.hidden_states[layer]) < TOL, f"layer {layer}"


def test_config_fields(mamba2_folders):
    cfg = HookedMamba2.from_pretrained(mamba2_folders["grouped_nonsquare"]).cfg
    assert (cfg.n_heads, cfg.n_groups, cfg.d_k, cfg.d_v) == (8, 2, 8, 12)
    assert (cfg.n_layers, cfg.d_model, cfg.d_vocab, cfg.d_inner, cfg.conv_dim) == (3, 48, 101, 96, 96 + 2 * 2 * 8)
    assert cfg.recurrent_layers == [0, 1, 2] and cfg.attention_layers == []
    other = HookedMamba2.from_pretrained(mamba2_folders["biased_clamped_tied"]).cfg
    assert other.time_step_limit == (0.3, 1.2) and other.tie_word_embeddings and not other.residual_in_fp32


def test_tied_checkpoint_has_no_lm_head(mamba2_folders):
    from safetensors import safe_open

    with safe_open(str(mamba2_folders["biased_clamped_tied"] / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = HookedMamba2.from_pretrained(mamba2_folders["biased_clamped_tied"])
    assert torch.equal(model.W_U, model.W_E.T)


def test_cache_matches_transformers_states(mamba2_pair):
    """Our state is the transpose of transformers' [batch, head, head_dim, d_state]; our conv history holds its last
    kernel - 1 inputs (transformers keeps kernel)."""
    hf, model = mamba2_pair
    tokens = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = hf(tokens, use_cache=True)
        cache = model.empty_cache()
        model(tokens, cache=cache)
    for layer in range(model.cfg.n_layers):
        ref_state = out.cache.get_recurrent_state(layer)
        assert ref_state.shape == (2, model.cfg.n_heads, model.cfg.d_v, model.cfg.d_k)
        assert relative_error(cache.recurrent_state(layer), ref_state.transpose(-1, -2)) <= 1e-4
        assert relative_error(cache.layers[layer]["conv"], out.cache.get_conv_state(layer)[..., 1:]) <= 1e-5


def test_from_hf_model_and_bf16(mamba2_pair):
    hf, model = mamba2_pair
    converted = HookedMamba2.from_hf_model(hf)
    tokens = torch.randint(0, 100, (1, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(converted(tokens), model(tokens))
        half = HookedMamba2.from_hf_model(hf, dtype=torch.bfloat16)
        assert half.cfg.dtype == torch.bfloat16
        low, cache = half.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
        full = model(tokens)
    assert cache["blocks.1.hook_resid_post"].dtype == torch.float32  # residual_in_fp32, as transformers
    assert relative_error(low.float(), full) < 0.1  # bf16 weights: coarse agreement, and no crash in the fp32 recurrence


def test_tokenizer_is_loaded_and_used(tmp_path):
    folder = build_checkpoint_with_tokenizer(tmp_path / "tok")
    model = HookedMamba2.from_pretrained(folder)
    assert model.tokenizer is not None
    # this tokenizer adds no BOS itself, so none is prepended by default
    assert model.cfg.default_prepend_bos is False
    text = "The cat sat on the mat"
    tokens = model.to_tokens(text)
    assert tokens.shape[0] == 1 and model.to_string(tokens[0]) == text
    with torch.no_grad():
        assert torch.equal(model(text), model(tokens))
    out = model.generate(text, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
    assert isinstance(out, str) and out.startswith(text)
