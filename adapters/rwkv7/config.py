"""``HookedRWKV7Config``: what the hooked model needs from fla's ``RWKV7Config`` (read from ``config.json`` as a plain
mapping: transformers does not know model_type ``rwkv7`` without importing fla, which needs triton).

Naming: the state of one head is ``[d_k, d_v]`` as in every family, ``d_k = head_dim`` and
``d_v = value_dim / n_heads`` (equal to ``head_dim`` unless the checkpoint widens the values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar
from types import SimpleNamespace

import torch

from writesae_lens.hooking.config import RECURRENT, UNBOUNDED_CONTEXT, FamilyConfig

SUPPORTED_MODEL_TYPES = ("rwkv7",)
DECAY_FLOOR = 0.6065306597126334  # w = -DECAY_FLOOR * sigmoid(.) = -exp(-0.5) * sigmoid(.)


@dataclass
class HookedRWKV7Config(FamilyConfig):
    n_layers: int
    d_model: int
    d_vocab: int
    n_heads: int
    d_k: int  # head_dim: width of r, k, kk, a, w per head
    d_v: int  # value_dim / n_heads
    d_mlp: int  # the channel-mix width (intermediate_size)
    decay_low_rank_dim: int
    gate_low_rank_dim: int
    a_low_rank_dim: int
    v_low_rank_dim: int
    eps: float  # norm_eps (LayerNorms); the per-head GroupNorm uses d_k * eps, as fla
    norm_bias: bool = True
    n_ctx: int = UNBOUNDED_CONTEXT  # no positional limit
    model_name: str = field(default="rwkv7", kw_only=True)
    hf_architecture: ClassVar[str] = "RWKV7ForCausalLM"
    norm_kind: ClassVar[str] = "LN"

    @property
    def key_dim(self) -> int:
        return self.n_heads * self.d_k

    @property
    def value_dim(self) -> int:
        return self.n_heads * self.d_v

    @property
    def layer_types(self) -> list[str]:
        return [RECURRENT] * self.n_layers

    @staticmethod
    def from_hf_config(hf_config, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "HookedRWKV7Config":
        """From fla's ``RWKV7Config`` or the ``config.json`` dict of a checkpoint (fla's defaults fill missing keys)."""
        c = SimpleNamespace(**hf_config) if isinstance(hf_config, dict) else hf_config
        check_model_type(c)
        get = lambda name, default=None: getattr(c, name, default)  # noqa: E731
        d_model, n_layers = int(get("hidden_size", 2048)), int(get("num_hidden_layers", 24))
        head_dim, n_heads = get("head_dim", 64), get("num_heads")
        if head_dim is None:
            head_dim = d_model // n_heads
        n_heads = d_model // head_dim
        if d_model % head_dim:
            raise ValueError(f"hidden_size ({d_model}) must be a multiple of head_dim ({head_dim})")
        value_dim = get("value_dim") or d_model
        value_dims = value_dim if isinstance(value_dim, list) else [value_dim] * n_layers
        if len(set(value_dims)) != 1 or value_dims[0] % n_heads:
            raise ValueError(f"value_dim {value_dim} must be one multiple of num_heads ({n_heads}) for every layer")
        if get("hidden_act", "sqrelu") != "sqrelu":
            raise ValueError(f"unsupported hidden_act {get('hidden_act')!r}; supported: 'sqrelu'")
        if not get("norm_first", True):
            raise ValueError("only norm_first=True RWKV-7 checkpoints are supported")
        if get("attn") is not None:
            raise ValueError("hybrid RWKV-7 checkpoints (config.attn set) are not supported")
        d_mlp = get("intermediate_size")
        if d_mlp is None:
            d_mlp = int(d_model * (get("hidden_ratio") or 4))
            d_mlp = 32 * ((d_mlp + 31) // 32)
        eos = get("eos_token_id", 2)
        eos = eos[0] if isinstance(eos, list) else eos
        return HookedRWKV7Config(
            n_layers=n_layers,
            d_model=d_model,
            d_vocab=int(get("vocab_size", 32000)),
            n_heads=n_heads,
            d_k=int(head_dim),
            d_v=value_dims[0] // n_heads,
            d_mlp=int(d_mlp),
            decay_low_rank_dim=int(get("decay_low_rank_dim", 64)),
            gate_low_rank_dim=int(get("gate_low_rank_dim", 128)),
            a_low_rank_dim=int(get("a_low_rank_dim", 64)),
            v_low_rank_dim=int(get("v_low_rank_dim", 16)),
            eps=float(get("norm_eps", 1e-5)),
            norm_bias=bool(get("norm_bias", True)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            eos_token_id=eos,
            bos_token_id=get("bos_token_id", 1),
            pad_token_id=get("pad_token_id"),
            device=str(device),
            dtype=dtype,
            model_name=get("_name_or_path", "") or "rwkv7",
        )


def check_model_type(hf_config) -> None:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"HookedRWKV7 cannot load model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(flash-linear-attention RWKV7ForCausalLM checkpoints)"
        )
