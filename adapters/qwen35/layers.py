"""The two token mixers of a Qwen3.5 hybrid and the block that holds either.

Gated DeltaNet (``blocks.{l}.mixer``), per layer:
    qkv = SiLU(causal depthwise conv(in_proj_qkv(x)));  q, k <- L2-normalised, key heads repeated to value heads
    q <- q / sqrt(d_k);  beta = sigmoid(in_proj_b(x));  g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)
    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T;  o_t = S_t^T q_t
    out = out_proj(RMSNorm_head(o) * w * SiLU(z)),  z = in_proj_z(x)

Gated attention (``blocks.{l}.attn``): q_proj gives query | gate per head; q_norm / k_norm (zero-centred RMSNorm over
the head dim); rotary embedding on the first ``rotary_dim`` dims; causal softmax attention with grouped KV heads;
``z * sigmoid(gate)`` then o_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from writesae_lens.hooking.components import GatedMLP, RMSNorm
from writesae_lens.hooking.conv import causal_conv
from writesae_lens.hooking.grouped_attention import grouped_mix, grouped_scores
from writesae_lens.hooking.padding import pad_mask
from writesae_lens.hooking.write_mixer import MatrixWriteMixer
from writesae_lens.ops.gated_delta import at_positions

from .config import ATTENTION, HookedQwen35Config
from writesae_lens.ops.precision import compute_dtype, upcast


def l2_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(|x|^2 + eps)`` over the last axis (the convention of the reference kernels)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(MatrixWriteMixer):
    """Hooks (besides the write interface of ``MatrixWriteMixer``): ``hook_gate`` [batch, pos, head, d_v] = z."""

    delta_rule = True

    def __init__(self, cfg: HookedQwen35Config) -> None:
        super().__init__()
        self.cfg = cfg
        key_dim, value_dim = cfg.n_key_heads * cfg.d_k, cfg.n_heads * cfg.d_v
        self.conv_dim = 2 * key_dim + value_dim
        self.in_proj_qkv = nn.Linear(cfg.d_model, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(cfg.d_model, value_dim, bias=False)
        self.in_proj_b = nn.Linear(cfg.d_model, cfg.n_heads, bias=False)
        self.in_proj_a = nn.Linear(cfg.d_model, cfg.n_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(cfg.n_heads))
        self.A_log = nn.Parameter(torch.zeros(cfg.n_heads))
        self.norm_w = nn.Parameter(torch.ones(cfg.d_v))
        self.out_proj = nn.Linear(value_dim, cfg.d_model, bias=False)
        self.hook_gate = HookPoint()  # [batch, pos, head, d_v]

    def forward(self, x: Tensor, layer_cache: dict | None, keep: Tensor | None = None) -> Tensor:
        """``keep`` [batch, n_keep]: the output only at those positions (the recurrence still runs them all)."""
        cfg = self.cfg
        batch, n_pos, _ = x.shape
        mixed = causal_conv(self.in_proj_qkv(x), self.conv1d.weight, None, layer_cache)  # [batch, pos, conv_dim]
        q, k, v = mixed.split([cfg.n_key_heads * cfg.d_k, cfg.n_key_heads * cfg.d_k, cfg.n_heads * cfg.d_v], dim=-1)
        repeat = cfg.n_heads // cfg.n_key_heads
        q = upcast(q.reshape(batch, n_pos, cfg.n_key_heads, cfg.d_k).repeat_interleave(repeat, dim=2))
        k = upcast(k.reshape(batch, n_pos, cfg.n_key_heads, cfg.d_k).repeat_interleave(repeat, dim=2))
        v = upcast(v.reshape(batch, n_pos, cfg.n_heads, cfg.d_v))
        q = l2_normalise(q) * cfg.d_k**-0.5  # [batch, pos, head, d_k]
        k = l2_normalise(k)  # [batch, pos, head, d_k]
        beta, log_decay = self._strength_and_decay(self.in_proj_b(x), self.in_proj_a(x))  # [batch, pos, head] each

        reads = self.recur_with_cache(q, k, v, beta, log_decay, layer_cache)  # [batch, pos, head, d_v]
        if keep is not None:
            reads, x, n_pos = at_positions(reads, keep), at_positions(x, keep), keep.shape[1]

        z = self.hook_gate(self.in_proj_z(x).reshape(batch, n_pos, cfg.n_heads, cfg.d_v))
        return self.out_proj(self._gated_norm(reads.to(x.dtype), z).reshape(batch, n_pos, -1))

    has_head_write_factors = True

    def head_write_factors(self, x: Tensor, head: int) -> dict[str, Tensor]:
        """The factors of ``forward`` for one value head, from its key head's and its own rows of the projections."""
        cfg = self.cfg
        key_dim = cfg.n_key_heads * cfg.d_k
        key_start = key_dim + head // (cfg.n_heads // cfg.n_key_heads) * cfg.d_k  # q | k | v channels
        value_start = 2 * key_dim + head * cfg.d_v
        channels = torch.cat([torch.arange(key_start, key_start + cfg.d_k),
                              torch.arange(value_start, value_start + cfg.d_v)]).to(x.device)
        projected = F.linear(x, self.in_proj_qkv.weight[channels])  # [batch, pos, d_k + d_v]
        k, v = causal_conv(projected, self.conv1d.weight[channels], None, None).split([cfg.d_k, cfg.d_v], dim=-1)
        one = slice(head, head + 1)
        beta, log_decay = self._strength_and_decay(F.linear(x, self.in_proj_b.weight[one]),
                                                   F.linear(x, self.in_proj_a.weight[one]), one)
        return {"write_k": l2_normalise(upcast(k[:, :, None])), "write_v": upcast(v[:, :, None]),
                "write_beta": beta, "decay": log_decay}

    def _strength_and_decay(self, b: Tensor, a: Tensor, heads: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """The write strength ``sigmoid(b)`` and the log decay ``-exp(A_log) softplus(a + dt_bias)`` of ``heads``
        from their projections ``b``, ``a`` [batch, pos, len(heads)] (fp32)."""
        return upcast(torch.sigmoid(b)), -upcast(self.A_log[heads]).exp() * F.softplus(upcast(a) + self.dt_bias[heads])

    def _gated_norm(self, reads: Tensor, gate: Tensor) -> Tensor:
        """Per-head RMSNorm of the read, times the weight, times SiLU of the gate."""
        r = upcast(reads)
        normed = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + self.cfg.eps)
        return ((self.norm_w * normed.to(reads.dtype)) * F.silu(upcast(gate))).to(reads.dtype)


class GatedAttention(nn.Module):
    """Hooks: ``hook_q`` / ``hook_k`` / ``hook_v`` [batch, pos, head, d_head] (q, k after their norms, before rotary),
    ``hook_rot_q`` / ``hook_rot_k`` (after rotary), ``hook_attn_scores`` / ``hook_pattern`` [batch, head, q_pos, k_pos],
    ``hook_z`` [batch, pos, head, d_head] (attention-weighted values), ``hook_gate`` [batch, pos, head, d_head]
    (sigmoid of the output gate; the output is ``o_proj(z * gate)``). While nothing listens to the scores or the
    pattern, they are never materialised: the fused ``scaled_dot_product_attention`` computes ``z`` (same values up to
    float rounding)."""

    def __init__(self, cfg: HookedQwen35Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_attn_heads * cfg.d_head * 2, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.d_head, bias=False)
        self.o_proj = nn.Linear(cfg.n_attn_heads * cfg.d_head, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.d_head, cfg.eps, zero_centred=True)
        self.k_norm = RMSNorm(cfg.d_head, cfg.eps, zero_centred=True)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float) / cfg.rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        for name in ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern",
                     "hook_z", "hook_gate"):
            setattr(self, name, HookPoint())

    def forward(self, x: Tensor, layer_cache: dict | None, pos_offset: int | Tensor,
                keep: Tensor | None = None) -> Tensor:
        """``keep`` [batch, n_keep]: queries (and the output) only at those positions; keys and values, and so the
        cache, still cover every position."""
        cfg = self.cfg
        batch, n_pos, _ = x.shape
        steps = torch.arange(n_pos, device=x.device)
        query_at = steps if keep is None else keep.to(x.device)  # [q] or [batch, q]: the queries' positions here
        n_q = query_at.shape[-1]
        x_q = x if keep is None else at_positions(x, keep)
        query_gate = self.q_proj(x_q).reshape(batch, n_q, cfg.n_attn_heads, 2 * cfg.d_head)
        q, gate = query_gate.chunk(2, dim=-1)
        q = self.hook_q(self.q_norm(q))  # [batch, q_pos, head, d_head]
        k = self.hook_k(self.k_norm(self.k_proj(x).reshape(batch, n_pos, cfg.n_kv_heads, cfg.d_head)))
        v = self.hook_v(self.v_proj(x).reshape(batch, n_pos, cfg.n_kv_heads, cfg.d_head))
        key_angles = self._rotary(pos_offset, steps, x)
        query_angles = key_angles if keep is None else self._rotary(pos_offset, query_at, x)
        q, k = self.hook_rot_q(_rotate(q, *query_angles)), self.hook_rot_k(_rotate(k, *key_angles))

        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [batch, kv_head, pos, d_head]
        shared = None  # (keys, values, source, valid): cached keys read in place by several rows (see below)
        valid = None  # [batch, key_pos]: which cached keys are real (a stacked cache right-pads rows)
        if layer_cache is not None:
            if "source" in layer_cache:  # rows continue shared sequences: their own keys are kept apart
                shared = (layer_cache["k"], layer_cache["v"], layer_cache["source"], layer_cache["valid"])
                own_k, own_v = layer_cache.get("k_own"), layer_cache.get("v_own")
                if own_k is not None:
                    k, v = torch.cat([own_k, k], dim=2), torch.cat([own_v, v], dim=2)
                layer_cache["k_own"], layer_cache["v_own"] = k, v
            else:
                if "k" in layer_cache:
                    k = torch.cat([layer_cache["k"], k], dim=2)
                    v = torch.cat([layer_cache["v"], v], dim=2)
                layer_cache["k"], layer_cache["v"] = k, v
                pad = pad_mask(layer_cache)  # left pads (a call that starts the sequence): their keys stay masked
                if "valid" in layer_cache or pad is not None:
                    new_valid = ~pad if pad is not None else torch.ones(batch, n_pos, dtype=torch.bool,
                                                                         device=x.device)
                    old_valid = layer_cache.get("valid")
                    valid = new_valid if old_valid is None else torch.cat([old_valid, new_valid], dim=1)
                    layer_cache["valid"] = valid
        repeat = cfg.n_attn_heads // cfg.n_kv_heads
        grouped_q = q.transpose(1, 2).reshape(batch, cfg.n_kv_heads, repeat, n_q, cfg.d_head)
        n_keys = k.shape[2]
        # a query at position i of this call sees the keys up to its own (the new keys are the last n_pos)
        allowed = torch.arange(n_keys, device=x.device) <= (query_at + n_keys - n_pos)[..., None]  # [(batch,) q, k]
        allowed = allowed.reshape(-1 if allowed.dim() == 3 else 1, 1, n_q, n_keys)  # [batch or 1, 1, q, k]
        if valid is not None:
            allowed = allowed & valid[:, None, None, :]  # [batch, 1, q_pos, k_pos]
            pad = pad_mask(layer_cache)
            if pad is not None:  # a pad query sees its own key only (no empty softmax row; no real query sees it)
                pad_q = pad if keep is None else pad.gather(1, keep.to(pad.device))  # [batch, q]
                own = torch.arange(n_keys, device=x.device) == (query_at + n_keys - n_pos)[..., None]  # [(b,) q, k]
                allowed = allowed | (own & pad_q[..., None])[:, None]
        if shared is None and not (self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()):
            # nobody looks at the scores: the fused kernel, on the same folded layout and mask
            folded_allowed = allowed.unsqueeze(-3).expand(*allowed.shape[:-2], repeat, n_q, n_keys)
            grouped_z = F.scaled_dot_product_attention(
                grouped_q.flatten(2, 3), k, v, attn_mask=folded_allowed.flatten(-3, -2), scale=cfg.d_head**-0.5
            ).unflatten(2, (repeat, n_q))  # [b, kv_head, repeat, q, d]
            return self._output(grouped_z, gate)
        scores = grouped_scores(grouped_q, k)  # [b, kv_head, repeat, q, k]
        if shared is not None:  # the shared keys come first on the key axis, masked by each row's valid length
            shared_k, shared_v, source, shared_valid = shared
            scores = torch.cat([grouped_scores(grouped_q, shared_k, source), scores], dim=-1)
            allowed = torch.cat([shared_valid[:, None, None, :].expand(batch, 1, n_q, -1),
                                 allowed.expand(batch, 1, n_q, n_keys)], dim=-1)
        scores = scores.flatten(1, 2) * cfg.d_head**-0.5  # [batch, head, q_pos, k_pos]
        scores = self.hook_attn_scores(scores.masked_fill(~allowed, float("-inf")))
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1, dtype=compute_dtype(scores)).to(q.dtype))
        grouped_pattern = pattern.unflatten(1, (cfg.n_kv_heads, repeat))
        grouped_z = grouped_mix(grouped_pattern[..., -n_keys:], v)  # [b, kv_head, repeat, q, d]
        if shared is not None:
            grouped_z = grouped_z + grouped_mix(grouped_pattern[..., :-n_keys], shared_v, source)
        return self._output(grouped_z, gate)

    def _output(self, grouped_z: Tensor, gate: Tensor) -> Tensor:
        """``o_proj(z * sigmoid(gate))`` from the attention-weighted values [batch, kv_head, repeat, pos, d_head]."""
        batch, n_pos = gate.shape[:2]
        z = self.hook_z(grouped_z.flatten(1, 2).transpose(1, 2))  # [batch, pos, head, d_head]
        gate = self.hook_gate(torch.sigmoid(gate))
        return self.o_proj((z * gate).reshape(batch, n_pos, -1))

    def _rotary(self, pos_offset, steps: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [1 or batch, pos, 1, rotary_dim] at positions ``pos_offset + steps``; ``pos_offset`` is an int or
        a per-row [batch] tensor, ``steps`` [pos] or per row [batch, pos]."""
        if isinstance(pos_offset, Tensor):
            positions = (pos_offset.to(x.device)[:, None] + steps).float()  # [batch, pos]
        else:
            positions = (pos_offset + steps).float()
        positions = positions.reshape(-1 if positions.dim() == 2 else 1, positions.shape[-1])  # [1 or batch, pos]
        freqs = positions[..., None] * self.inv_freq
        angles = torch.cat([freqs, freqs], dim=-1)  # [1 or batch, pos, rotary_dim]
        return angles.cos().to(x.dtype)[:, :, None], angles.sin().to(x.dtype)[:, :, None]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on the first ``rotary_dim`` dims (the half-split convention); the rest pass through."""
    dim = cos.shape[-1]
    rot, rest = x[..., :dim], x[..., dim:]
    first, second = rot[..., : dim // 2], rot[..., dim // 2 :]
    rotated = torch.cat([-second, first], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class Qwen35Block(nn.Module):
    """Hooks: ``hook_resid_pre``, ``hook_attn_out`` (attention layers) or ``hook_mixer_out`` (recurrent layers),
    ``hook_resid_mid``, ``hook_mlp_out``, ``hook_resid_post``: all [batch, pos, d_model], with
    ``resid_mid = resid_pre + attn_out|mixer_out`` and ``resid_post = resid_mid + mlp_out``."""

    def __init__(self, cfg: HookedQwen35Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.is_attention = cfg.layer_types[layer] == ATTENTION
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps, zero_centred=True)
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps, zero_centred=True)
        if self.is_attention:
            self.attn = GatedAttention(cfg)
            self.hook_attn_out = HookPoint()
        else:
            self.mixer = GatedDeltaNet(cfg)
            self.hook_mixer_out = HookPoint()
        self.mlp = GatedMLP(cfg.d_model, cfg.d_mlp, cfg.act_fn)
        self.hook_resid_pre = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    supports_keep = True  # forward(..., keep=positions): see HookedRecurrentLM.forward's final_positions

    def mixer_input(self, resid: Tensor) -> Tensor:
        """What the token mixer reads: ``ln1(resid)``."""
        return self.ln1(resid)

    def forward(self, resid: Tensor, layer_cache: dict | None, pos_offset: int | Tensor,
                keep: Tensor | None = None) -> Tensor:
        """``keep`` [batch, n_keep]: the output [batch, n_keep, d_model] only at those positions; the mixer (and so the
        cache) still runs every position, the hook points after it see only the kept ones."""
        resid = self.hook_resid_pre(resid)
        if self.is_attention:
            mixed = self.hook_attn_out(self.attn(self.mixer_input(resid), layer_cache, pos_offset, keep))
        else:
            mixed = self.hook_mixer_out(self.mixer(self.mixer_input(resid), layer_cache, keep))
        if keep is not None:
            resid = at_positions(resid, keep)
        resid = self.hook_resid_mid(resid + mixed)
        resid = self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(self.ln2(resid))))
        return resid
