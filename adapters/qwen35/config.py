"""``HookedQwen35Config``: what the hooked model needs from a transformers Qwen3.5 config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from writesae_lens.hooking.config import ATTENTION, RECURRENT, FamilyConfig

SUPPORTED_MODEL_TYPES = ("qwen3_5_text", "qwen3_5")


@dataclass
class HookedQwen35Config(FamilyConfig):
    n_layers: int
    d_model: int
    d_vocab: int
    d_mlp: int
    layer_types: list[str]
    # Gated DeltaNet layers: ``n_heads`` value heads share ``n_key_heads`` key/query heads.
    n_heads: int
    n_key_heads: int
    d_k: int
    d_v: int
    conv_kernel: int
    # full-attention layers
    n_attn_heads: int
    n_kv_heads: int
    d_head: int
    rotary_dim: int
    rope_theta: float
    eps: float
    n_ctx: int
    act_fn: str = "silu"
    model_name: str = field(default="qwen3_5", kw_only=True)
    hf_architecture: ClassVar[str] = "Qwen3_5ForCausalLM"
    norm_kind: ClassVar[str] = "RMS"

    @staticmethod
    def from_hf_config(hf_config, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "HookedQwen35Config":
        """Read a ``Qwen3_5TextConfig`` or the multimodal ``Qwen3_5Config`` (its ``text_config``)."""
        text = text_config_of(hf_config)
        layer_types = list(text.layer_types)
        unknown = sorted(set(layer_types) - {RECURRENT, ATTENTION})
        if unknown:
            raise ValueError(f"unsupported layer types {unknown}; supported: {RECURRENT!r}, {ATTENTION!r}")
        if text.linear_num_value_heads % text.linear_num_key_heads:
            raise ValueError(
                f"linear_num_value_heads ({text.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({text.linear_num_key_heads})"
            )
        rope = dict(text.rope_parameters or {})
        d_head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rotary_dim = int(d_head * rope.get("partial_rotary_factor", 1.0))
        eos = text.eos_token_id if not isinstance(text.eos_token_id, list) else text.eos_token_id[0]
        return HookedQwen35Config(
            n_layers=text.num_hidden_layers,
            d_model=text.hidden_size,
            d_vocab=text.vocab_size,
            d_mlp=text.intermediate_size,
            layer_types=layer_types,
            n_heads=text.linear_num_value_heads,
            n_key_heads=text.linear_num_key_heads,
            d_k=text.linear_key_head_dim,
            d_v=text.linear_value_head_dim,
            conv_kernel=text.linear_conv_kernel_dim,
            n_attn_heads=text.num_attention_heads,
            n_kv_heads=text.num_key_value_heads,
            d_head=d_head,
            rotary_dim=rotary_dim,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            eps=text.rms_norm_eps,
            n_ctx=text.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False) or text.tie_word_embeddings),
            act_fn=text.hidden_act,
            eos_token_id=eos,
            bos_token_id=text.bos_token_id,
            device=str(device),
            dtype=dtype,
            model_name=getattr(hf_config, "_name_or_path", "") or hf_config.model_type,
        )


def text_config_of(hf_config):
    """The text part of a Qwen3.5 config; a clear error for any other model type."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"HookedQwen35 cannot load model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Qwen3.5 text models and the multimodal Qwen3.5 wrapper, whose vision weights are ignored)"
        )
    return hf_config.text_config if model_type == "qwen3_5" else hf_config
