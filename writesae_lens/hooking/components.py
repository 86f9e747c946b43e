"""Family-independent building blocks with TransformerLens-style hook points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from ..ops.precision import upcast


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Tensor) -> Tensor:  # [batch, pos] -> [batch, pos, d_model]
        return F.embedding(tokens, self.W_E)


class Unembed(nn.Module):
    """``logits = x @ W_U``; the weight is stored as transformers stores it, ``[d_vocab, d_model]``."""

    def __init__(self, d_model: int, d_vocab: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_vocab, d_model))

    @property
    def W_U(self) -> Tensor:  # [d_model, d_vocab]
        return self.weight.T

    def forward(self, x: Tensor) -> Tensor:  # [batch, pos, d_model] -> [batch, pos, d_vocab]
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    """``x / rms(x) * w`` in fp32, or ``* (1 + w)`` when ``zero_centred`` (Qwen3.5's norms store ``w - 1``).

    Hooks: ``hook_scale`` [batch, pos, 1] = rms(x); ``hook_normalized`` [batch, pos, d] = x / rms(x) (before the weight).
    """

    def __init__(self, d: int, eps: float, zero_centred: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d) if zero_centred else torch.ones(d))
        self.eps = eps
        self.zero_centred = zero_centred
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    def forward(self, x: Tensor) -> Tensor:
        x32 = upcast(x)
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized(x32 / scale)
        weight = (1.0 + upcast(self.w)) if self.zero_centred else upcast(self.w)
        return (normalized * weight).type_as(x)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``. Hooks: ``hook_pre`` = gate(x), ``hook_pre_linear`` = up(x),
    ``hook_post`` = act(gate(x)) * up(x); all [batch, pos, d_mlp]."""

    def __init__(self, d_model: int, d_mlp: int, act: str = "silu") -> None:
        super().__init__()
        if act != "silu":
            raise ValueError(f"unsupported MLP activation {act!r}; supported: 'silu'")
        self.gate_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.up_proj = nn.Linear(d_model, d_mlp, bias=False)
        self.down_proj = nn.Linear(d_mlp, d_model, bias=False)
        self.hook_pre = HookPoint()
        self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        gate = self.hook_pre(self.gate_proj(x))
        up = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(F.silu(gate) * up))
