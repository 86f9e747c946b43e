"""HookedQwen35 against transformers' Qwen3_5ForCausalLM on tiny random checkpoints (fp32)."""

import pytest
import torch
from transformers import Qwen3_5ForCausalLM

from closeness import relative_error
from qwen35_factory import CONFIGS, build_multimodal_checkpoint
from writesae_lens.adapters.qwen35 import HookedQwen35


TOL = 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_residuals_match_transformers(qwen35_folders, name):
    folder = qwen35_folders[name]
    hf = Qwen3_5ForCausalLM.from_pretrained(folder).eval()
    model = HookedQwen35.from_pretrained(folder).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True, use_cache=False)
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert (logits - ref.logits).abs().max().item() < TOL * max(1.0, ref.logits.abs().max().item())
    # transformers' hidden_states[l + 1] is the output of decoder layer l, except the last (which is final-normed)
    for layer in range(model.cfg.n_layers - 1):
        ours = cache[f"blocks.{layer}.hook_resid_post"]
        assert relative_error(ours, ref.hidden_states[layer + 1]) < TOL, f"layer {layer}"


def test_config_fields(qwen35_folders):
    model = HookedQwen35.from_pretrained(qwen35_folders["gqa_nonsquare"])
    cfg = model.cfg
    assert (cfg.n_heads, cfg.n_key_heads, cfg.d_k, cfg.d_v) == (4, 2, 8, 12)
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert cfg.recurrent_layers == [0, 1, 2] and cfg.attention_layers == [3]
    assert (cfg.n_layers, cfg.d_model, cfg.d_vocab) == (4, 48, 101)
    custom = HookedQwen35.from_pretrained(qwen35_folders["square_custom_layers"]).cfg
    assert custom.layer_types == CONFIGS["square_custom_layers"]["layer_types"]


def test_sampling_is_seeded_and_respects_top_k(qwen35_pair):
    _, model = qwen35_pair
    prompt = torch.tensor([[3, 1, 4]])
    a = model.generate(prompt, max_new_tokens=6, seed=7, top_k=5, stop_at_eos=False, verbose=False)
    b = model.generate(prompt, max_new_tokens=6, seed=7, top_k=5, stop_at_eos=False, verbose=False)
    assert torch.equal(a, b)
    greedy = model.generate(prompt, max_new_tokens=6, top_k=1, seed=3, stop_at_eos=False, verbose=False)
    assert torch.equal(greedy, model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False))


def test_multimodal_wrapper_loads_text_weights(tmp_path, qwen35_folders):
    from transformers import Qwen3_5ForConditionalGeneration

    folder = build_multimodal_checkpoint(tmp_path / "mm")
    model = HookedQwen35.from_pretrained(folder)
    hf = Qwen3_5ForConditionalGeneration.from_pretrained(folder).eval()
    tokens = torch.randint(0, 90, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        ours = model(tokens)
    assert relative_error(ours, ref) < TOL


def test_from_hf_model_and_bf16(qwen35_pair):
    hf, model = qwen35_pair
    converted = HookedQwen35.from_hf_model(hf)
    tokens = torch.randint(0, 100, (1, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(converted(tokens), model(tokens))
        half = HookedQwen35.from_hf_model(hf, dtype=torch.bfloat16)
        assert half.cfg.dtype == torch.bfloat16
        low = half(tokens).float()
    full = model(tokens)
    assert relative_error(low, full) < 0.1  # bf16 weights: coarse agreement, and no crash in the fp32 recurrence
