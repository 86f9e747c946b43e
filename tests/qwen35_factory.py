"""Tiny random Qwen3.5 checkpoints for the tests: built with transformers, saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

# Named configurations. Non-square heads (d_k != d_v) and fewer key heads than value heads show axis mistakes.
CONFIGS = {
    "gqa_nonsquare": dict(
        linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    ),
    "square_custom_layers": dict(
        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=3, linear_num_value_heads=3,
        num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=1,
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention", "linear_attention"],
    ),
    "recurrent_only": dict(
        linear_key_head_dim=6, linear_value_head_dim=10, linear_num_key_heads=1, linear_num_value_heads=2,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        layer_types=["linear_attention", "linear_attention"],
    ),
}


def text_config(name: str, vocab_size: int = 101):
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=80, head_dim=12, max_position_embeddings=512,
        rms_norm_eps=1e-6, eos_token_id=vocab_size - 1, **CONFIGS[name],
    )


def randomise(model, seed: int, norm_offset: float = 0.0, decay_rate_range: tuple[float, float] = (0.2, 4.2)) -> None:
    """Move every parameter off its structured init (norm weights 0/1, dt_bias 1, ...) so that no term hides.

    ``norm_offset``: the centre of norm weights (0 for zero-centred norms, 1 for plain ones); ``A = exp(A_log)`` is
    drawn uniformly in ``decay_rate_range``.
    """
    generator = torch.Generator().manual_seed(seed)
    low, high = decay_rate_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=generator) * (high - low) + low))
            elif "norm" in name:
                p.copy_(norm_offset + 0.3 * noise)
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(noise * p.shape[1] ** -0.5)  # unit-scale activations: every path matters to the output
            elif p.dim() == 3:  # depthwise conv kernels
                p.copy_(noise * 0.5)
            else:  # dt_bias, D, biases, embeddings
                p.copy_(noise)


def build_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    from transformers import Qwen3_5ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(text_config(name)).eval()
    randomise(model, seed)
    model.save_pretrained(folder)
    return folder


def build_multimodal_checkpoint(folder: Path, seed: int = 0) -> Path:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=48, patch_size=4,
                  num_position_embeddings=16)
    config = Qwen3_5Config(text_config=text_config("gqa_nonsquare").to_dict(), vision_config=vision)
    model = Qwen3_5ForConditionalGeneration(config).eval()
    randomise(model, seed)
    model.save_pretrained(folder)
    return folder
