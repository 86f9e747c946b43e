"""The RWKV-7 time-mix (``blocks.{l}.mixer``), channel-mix (``blocks.{l}.mlp``) and the block that holds them.

Per layer, as fla's ``RWKV7Attention`` computes it (``fla/layers/rwkv7.py``, 0.6.0), with ``x = attn_norm(resid)``:

    delta = x_{t-1} - x_t  (token shift; x_{-1} from the cache, else 0)
    x_c = x + delta * x_c  for c in r, w, k, v, a, g
    r = r_proj(x_r);  w = -exp(-1/2) sigmoid(w_lora(x_w));  k = k_proj(x_k);  v = v_proj(x_v)
    v = v (layer 0, which also defines v_first) or lerp(v, v_first, sigmoid(v_lora(x_v)))
    a = sigmoid(a_lora(x_a));  g = g_lora(x_g);  kk = L2norm(k * k_k) per head;  k = k * (1 + (a - 1) * k_a)
    S_t = (diag(exp(w_t)) - (a_t kk_t) kk_t^T) S_{t-1} + k_t v_t^T;   read_t = S_t^T r_t      (per head)
    out = o_proj((GroupNorm_heads(read) + (r . (k * r_k)) v) * g)

The recurrence is ``DPLRWriteMixer``'s with ``q = r``, ``beta = 1``, ``decay = w``, ``erase_a = kk * a``,
``erase_b = kk``. The channel mix is ``value(relu(key(x + delta * x_k))^2)`` with its own token shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from writesae_lens.hooking.dplr_mixer import DPLRWriteMixer
from writesae_lens.hooking.padding import pad_mask
from writesae_lens.hooking.write_mixer import run_hook_keeping_shape
from writesae_lens.ops.gated_delta import at_positions

from .config import DECAY_FLOOR, HookedRWKV7Config
from writesae_lens.ops.precision import upcast


class LayerNorm(nn.Module):
    """``(x - mean) / scale * weight + bias`` in fp32 (parameter names as torch's, so fla's keys map one to one).

    Hooks: ``hook_scale`` [batch, pos, 1] = sqrt(var(x) + eps);
    ``hook_normalized`` [batch, pos, d] = (x - mean) / scale.
    """

    def __init__(self, d: int, eps: float, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None
        self.eps = eps
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    def forward(self, x: Tensor) -> Tensor:
        x32 = upcast(x)
        centred = x32 - x32.mean(-1, keepdim=True)
        scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        out = self.hook_normalized(centred / scale) * upcast(self.weight)
        if self.bias is not None:
            out = out + upcast(self.bias)
        return out.type_as(x)


class LoRA(nn.Module):
    """fla's ``LoRA``: ``Linear(d_in, rank, no bias) -> activation -> Linear(rank, d_out)`` (``lora.0``, ``lora.2``)."""

    def __init__(self, d_in: int, d_out: int, rank: int, activation: str | None, bias: bool = True) -> None:
        super().__init__()
        act = {None: nn.Identity(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid()}[activation]
        self.lora = nn.Sequential(nn.Linear(d_in, rank, bias=False), act, nn.Linear(rank, d_out, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.lora(x)


def token_shift(x: Tensor, layer_cache: dict | None, key: str) -> Tensor:
    """``x_{t-1} - x_t`` ([batch, pos, d]); the last input is carried in ``layer_cache[key]`` ([batch, d]), replaced and
    never written in place. With requested snapshots (``"snapshot_at"``), the carried input before each requested
    position is kept in ``layer_cache["snapshots"][key]`` ([batch, n_sel, d])."""
    previous = layer_cache.get(key) if layer_cache is not None else None
    if previous is None:
        previous = x.new_zeros(x.shape[0], x.shape[-1])
    pad = pad_mask(layer_cache)
    shifted = x if pad is None else x.masked_fill(pad[..., None], 0.0)  # left pads: a row sees zeros before it
    full = torch.cat([previous[:, None].to(x.dtype), shifted], dim=1)  # [batch, 1 + pos, d]
    if layer_cache is not None:
        layer_cache[key] = full[:, -1]
        if layer_cache.get("snapshot_at") is not None:
            layer_cache.setdefault("snapshots", {})[key] = at_positions(full, layer_cache["snapshot_at"])
    return full[:, :-1] - x


class VFirst:
    """Layer 0's value, shared with the later layers within one forward call (RWKV-7's "v-first" residual)."""

    value: Tensor | None = None


class RWKV7Mixer(DPLRWriteMixer):
    """The write interface of ``DPLRWriteMixer`` (k, v after the v-first lerp, beta = 1, decay = w per key channel,
    erase_a = kk * a, erase_b = kk, q = r) plus:

    ``hook_v_first`` [batch, pos, head, d_v] = layer 0's v (only in layer 0; later layers read it);
    ``hook_bonus`` [batch, pos, head, d_v] = (r . (k * r_k)) v, from the model's own r, k, v (write edits leave it);
    ``hook_gate`` [batch, pos, head, d_v] = g = g_lora(x_g); output = o_proj((GroupNorm(read) + bonus) * g).
    """

    def __init__(self, cfg: HookedRWKV7Config, layer: int, v_first: VFirst) -> None:
        super().__init__()
        self.cfg, self.layer, self.v_first = cfg, layer, v_first
        d, kd, vd = cfg.d_model, cfg.key_dim, cfg.value_dim
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, d)))
        self.k_k = nn.Parameter(torch.zeros(kd))
        self.k_a = nn.Parameter(torch.zeros(kd))
        self.r_k = nn.Parameter(torch.zeros(cfg.n_heads, cfg.d_k))
        self.r_proj = nn.Linear(d, kd, bias=False)
        self.k_proj = nn.Linear(d, kd, bias=False)
        self.v_proj = nn.Linear(d, vd, bias=False)
        self.o_proj = nn.Linear(vd, d, bias=False)
        self.w_lora = LoRA(d, kd, cfg.decay_low_rank_dim, "tanh")
        if layer != 0:
            self.v_lora = LoRA(d, vd, cfg.v_low_rank_dim, None)
        self.a_lora = LoRA(d, kd, cfg.a_low_rank_dim, None)
        self.g_lora = LoRA(d, vd, cfg.gate_low_rank_dim, "sigmoid", bias=False)
        self.g_norm = nn.GroupNorm(cfg.n_heads, vd, eps=cfg.d_k * cfg.eps, affine=True)
        self.hook_v_first = HookPoint()  # [batch, pos, head, d_v]
        self.hook_bonus = HookPoint()  # [batch, pos, head, d_v]
        self.hook_gate = HookPoint()  # [batch, pos, head, d_v]

    @property
    def output_projection(self) -> nn.Linear:
        return self.o_proj

    def forward(self, x: Tensor, layer_cache: dict | None) -> Tensor:
        cfg = self.cfg
        batch, n_pos, _ = x.shape
        heads = lambda t, d: upcast(t.reshape(batch, n_pos, cfg.n_heads, d))  # noqa: E731
        delta = token_shift(x, layer_cache, "shift_mixer")
        xr, xw, xk, xv, xa, xg = (x + delta * p for p in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r = heads(self.r_proj(xr), cfg.d_k)
        w = heads(-DECAY_FLOOR * torch.sigmoid(upcast(self.w_lora(xw))), cfg.d_k)
        k = heads(self.k_proj(xk), cfg.d_k)
        v = heads(self.v_proj(xv), cfg.d_v)
        if self.layer == 0:
            v = self.hook_v_first(v)
            self.v_first.value = v
        else:
            if self.v_first.value is None or self.v_first.value.shape != v.shape:
                raise ValueError("RWKV-7 layers after the first need layer 0's v in the same call (v-first)")
            v = torch.lerp(v, self.v_first.value, heads(torch.sigmoid(self.v_lora(xv)), cfg.d_v))
        a = heads(torch.sigmoid(self.a_lora(xa)), cfg.d_k)
        g = heads(self.g_lora(xg), cfg.d_v)
        kk = F.normalize(k * upcast(self.k_k).reshape(cfg.n_heads, cfg.d_k), dim=-1)
        k = k * (1 + (a - 1) * upcast(self.k_a).reshape(cfg.n_heads, cfg.d_k))
        bonus = (r * k * upcast(self.r_k)).sum(-1, keepdim=True) * v  # before the write hooks, which may edit in place
        ones = v.new_ones(batch, n_pos, cfg.n_heads)  # the write strength, in the compute dtype
        if torch.is_grad_enabled() and self.hook_write_beta.has_hooks():
            ones.requires_grad_()  # a constant, but edits of it (and backward hooks on it) take gradients

        if self.layer == 0 and self.hook_write_v.has_hooks():
            v = v.clone()  # an in-place write edit must not change v_first, which the later layers read
        reads = self.recur_with_cache(r, k, v, ones, w, layer_cache, erase_a=kk * a, erase_b=kk)  # [b, p, h, d_v]

        gn = self.g_norm  # its weights cast to the reads' (compute) dtype: bf16 / fp16 weights meet fp32 reads
        normed = F.group_norm(reads.reshape(batch * n_pos, cfg.value_dim), gn.num_groups, gn.weight.to(reads.dtype),
                              gn.bias.to(reads.dtype), gn.eps).reshape(batch, n_pos, cfg.n_heads, cfg.d_v)
        bonus = run_hook_keeping_shape(self.hook_bonus, bonus)
        g = run_hook_keeping_shape(self.hook_gate, g)
        return self.o_proj(((normed + bonus) * g).reshape(batch, n_pos, cfg.value_dim).to(x.dtype))


class RWKV7ChannelMix(nn.Module):
    """``value(relu(key(x + delta * x_k))^2)``. Hooks: ``hook_pre`` = key(.) and ``hook_post`` = relu(.)^2,
    [batch, pos, d_mlp]."""

    def __init__(self, cfg: HookedRWKV7Config) -> None:
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(cfg.d_model))
        self.key = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.value = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Tensor, layer_cache: dict | None) -> Tensor:
        delta = token_shift(x, layer_cache, "shift_mlp")
        pre = self.hook_pre(self.key(x + delta * self.x_k))
        return self.value(self.hook_post(F.relu(pre).square()))


class RWKV7Block(nn.Module):
    """Hooks (all [batch, pos, d_model]): ``hook_resid_pre``, ``hook_mixer_out``, ``hook_resid_mid`` = resid_pre +
    mixer_out, ``hook_mlp_out``, ``hook_resid_post`` = resid_mid + mlp_out; norms ``ln1`` (before the time mix) and
    ``ln2`` (before the channel mix)."""

    def __init__(self, cfg: HookedRWKV7Config, layer: int, v_first: VFirst) -> None:
        super().__init__()
        self.layer = layer
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps, cfg.norm_bias)
        self.mixer = RWKV7Mixer(cfg, layer, v_first)
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps, cfg.norm_bias)
        self.mlp = RWKV7ChannelMix(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_mixer_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid: Tensor, layer_cache: dict | None, pos_offset) -> Tensor:
        resid = self.hook_resid_pre(resid)
        resid = self.hook_resid_mid(resid + self.hook_mixer_out(self.mixer(self.ln1(resid), layer_cache)))
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid), layer_cache)))
