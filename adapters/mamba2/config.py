"""``HookedMamba2Config``: what the hooked model needs from a transformers ``Mamba2Config``.

Naming: the state of one head is ``[d_k, d_v]`` as in every family of the library, so ``d_k`` is Mamba-2's
``state_size`` (the width of B and C) and ``d_v`` its ``head_dim`` (the width of x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from writesae_lens.hooking.config import RECURRENT, UNBOUNDED_CONTEXT, FamilyConfig

SUPPORTED_MODEL_TYPES = ("mamba2",)


@dataclass
class HookedMamba2Config(FamilyConfig):
    n_layers: int
    d_model: int
    d_vocab: int
    n_heads: int
    n_groups: int  # B and C are shared by n_heads // n_groups consecutive heads
    d_k: int  # state_size: width of B_t, C_t
    d_v: int  # head_dim: width of x_t
    conv_kernel: int
    eps: float
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    use_bias: bool = False  # in_proj / out_proj biases
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    act_fn: str = "silu"
    n_ctx: int = UNBOUNDED_CONTEXT  # no positional limit
    model_name: str = field(default="mamba2", kw_only=True)
    hf_architecture: ClassVar[str] = "Mamba2ForCausalLM"
    norm_kind: ClassVar[str] = "RMS"

    @property
    def d_inner(self) -> int:
        """Width of x and of the gate z: ``n_heads * d_v``."""
        return self.n_heads * self.d_v

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x | B | C."""
        return self.d_inner + 2 * self.n_groups * self.d_k

    @property
    def layer_types(self) -> list[str]:
        return [RECURRENT] * self.n_layers

    @staticmethod
    def from_hf_config(hf_config, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "HookedMamba2Config":
        check_model_type(hf_config)
        d_inner = int(hf_config.expand * hf_config.hidden_size)
        if d_inner != hf_config.num_heads * hf_config.head_dim:
            raise ValueError(
                f"expand * hidden_size ({d_inner}) must equal num_heads * head_dim "
                f"({hf_config.num_heads} * {hf_config.head_dim})"
            )
        if hf_config.num_heads % hf_config.n_groups:
            raise ValueError(f"num_heads ({hf_config.num_heads}) must be a multiple of n_groups ({hf_config.n_groups})")
        if hf_config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hf_config.hidden_act!r}; supported: 'silu'")
        low, high = (float(x) for x in hf_config.time_step_limit)
        eos = hf_config.eos_token_id if not isinstance(hf_config.eos_token_id, list) else hf_config.eos_token_id[0]
        return HookedMamba2Config(
            n_layers=hf_config.num_hidden_layers,
            d_model=hf_config.hidden_size,
            d_vocab=hf_config.vocab_size,
            n_heads=hf_config.num_heads,
            n_groups=hf_config.n_groups,
            d_k=hf_config.state_size,
            d_v=hf_config.head_dim,
            conv_kernel=hf_config.conv_kernel,
            eps=hf_config.layer_norm_epsilon,
            time_step_limit=(low, high),
            use_bias=bool(hf_config.use_bias),
            use_conv_bias=bool(hf_config.use_conv_bias),
            residual_in_fp32=bool(hf_config.residual_in_fp32),
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            act_fn=hf_config.hidden_act,
            eos_token_id=eos,
            bos_token_id=hf_config.bos_token_id,
            pad_token_id=hf_config.pad_token_id,
            device=str(device),
            dtype=dtype,
            model_name=getattr(hf_config, "_name_or_path", "") or hf_config.model_type,
        )


def check_model_type(hf_config) -> None:
    """A clear error for any config that is not a transformers Mamba-2 config."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"HookedMamba2 cannot load model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(transformers' Mamba2ForCausalLM checkpoints)"
        )
