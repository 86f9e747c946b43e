"""The Mamba-2 mixer (``blocks.{l}.mixer``) and the block that holds it.

Per layer, as transformers' ``Mamba2Mixer`` computes it (its pure-torch path):

    z | xBC | dt = in_proj(h)
    x | B | C = SiLU(causal depthwise conv(xBC) + conv bias)    B, C: one per group, shared by n_heads / n_groups heads
    dt_t = clamp(softplus(dt + dt_bias), *time_step_limit);  A = -exp(A_log)   (one scalar per head)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          (transformers' state, [head_dim, d_state] per head)
    y_t = h_t C_t + D x_t
    out = out_proj(GroupRMSNorm(y * SiLU(z)) * w)       the norm runs over n_groups groups of d_inner / n_groups

The library keeps the state key side first, ``S = h^T`` of shape ``[d_state, head_dim] = [d_k, d_v]``, so the
recurrence is the write interface's with no erase term:

    S_t = exp(decay_t) S_{t-1} + beta_t k_t v_t^T,   k = B, v = x, beta = dt, decay = dt A;   read_t = S_t^T C_t

and ``y = read + skip`` with ``skip = D x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from writesae_lens.hooking.components import RMSNorm
from writesae_lens.hooking.conv import causal_conv
from writesae_lens.hooking.write_mixer import MatrixWriteMixer, run_hook_keeping_shape

from .config import HookedMamba2Config
from writesae_lens.ops.precision import upcast


class Mamba2Mixer(MatrixWriteMixer):
    """The write interface of ``MatrixWriteMixer`` (k = B, v = x, beta = dt, decay = dt A, q = C) plus:

    ``hook_skip`` [batch, pos, head, d_v] = D x_t (computed from the model's own x_t, so write edits leave it);
    ``hook_ssm_out`` [batch, pos, head, d_v] = read + skip (y, the input of the gated norm);
    ``hook_gate`` [batch, pos, head, d_v] = z.
    """

    delta_rule = False
    write_key_in_transition = False  # no erase: an edited B goes straight into the chunked run

    def __init__(self, cfg: HookedMamba2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_inner + cfg.conv_dim + cfg.n_heads, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(
            cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim, bias=cfg.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.ones(cfg.n_heads))
        self.A_log = nn.Parameter(torch.zeros(cfg.n_heads))
        self.D = nn.Parameter(torch.ones(cfg.n_heads))
        self.norm_w = nn.Parameter(torch.ones(cfg.d_inner))
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.use_bias)
        self.hook_skip = HookPoint()  # [batch, pos, head, d_v]
        self.hook_ssm_out = HookPoint()  # [batch, pos, head, d_v]
        self.hook_gate = HookPoint()  # [batch, pos, head, d_v]

    def forward(self, h: Tensor, layer_cache: dict | None) -> Tensor:
        cfg = self.cfg
        batch, n_pos, _ = h.shape
        z, xbc, dt = self.in_proj(h).split([cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1)
        xbc = causal_conv(xbc, self.conv1d.weight, self.conv1d.bias, layer_cache)  # [batch, pos, conv_dim]
        x, B, C = xbc.split([cfg.d_inner, cfg.n_groups * cfg.d_k, cfg.n_groups * cfg.d_k], dim=-1)
        x = upcast(x.reshape(batch, n_pos, cfg.n_heads, cfg.d_v))  # [batch, pos, head, d_v]
        heads_per_group = cfg.n_heads // cfg.n_groups
        B = upcast(B.reshape(batch, n_pos, cfg.n_groups, cfg.d_k)).repeat_interleave(heads_per_group, dim=2)
        C = upcast(C.reshape(batch, n_pos, cfg.n_groups, cfg.d_k)).repeat_interleave(heads_per_group, dim=2)
        dt, log_decay = self._time_step_and_decay(dt)  # dt and dt A: [batch, pos, head] each

        skip = upcast(self.D)[:, None] * x  # before the write hooks, which may edit x in place: [batch, pos, head, d_v]

        reads = self.recur_with_cache(C, B, x, dt, log_decay, layer_cache)  # reads [batch, pos, head, d_v]

        skip = run_hook_keeping_shape(self.hook_skip, skip)
        y = run_hook_keeping_shape(self.hook_ssm_out, reads + skip)
        z = run_hook_keeping_shape(self.hook_gate, z.reshape(batch, n_pos, cfg.n_heads, cfg.d_v))
        return self.out_proj(self._gated_norm(y, z).to(h.dtype))

    has_head_write_factors = True

    def head_write_factors(self, x: Tensor, head: int) -> dict[str, Tensor]:
        """The factors of ``forward`` for one head (k = B of its group, v = its x, beta = dt, decay = dt A), from
        its own rows of the projections."""
        cfg = self.cfg
        group = head // (cfg.n_heads // cfg.n_groups)
        x_start, b_start = head * cfg.d_v, cfg.d_inner + group * cfg.d_k  # x | B | C channels of the conv
        channels = torch.cat([torch.arange(x_start, x_start + cfg.d_v),
                              torch.arange(b_start, b_start + cfg.d_k)]).to(x.device)
        rows = torch.cat([cfg.d_inner + channels, torch.tensor([cfg.d_inner + cfg.conv_dim + head], device=x.device)])
        bias = self.in_proj.bias[rows] if self.in_proj.bias is not None else None
        projected, dt = F.linear(x, self.in_proj.weight[rows], bias).split([cfg.d_v + cfg.d_k, 1], dim=-1)
        conv_bias = self.conv1d.bias[channels] if self.conv1d.bias is not None else None
        value, key = causal_conv(projected, self.conv1d.weight[channels], conv_bias, None).split([cfg.d_v, cfg.d_k],
                                                                                                dim=-1)
        dt, log_decay = self._time_step_and_decay(dt, slice(head, head + 1))  # [batch, pos, 1] each
        return {"write_k": upcast(key[:, :, None]), "write_v": upcast(value[:, :, None]), "write_beta": dt,
                "decay": log_decay}

    def _time_step_and_decay(self, dt: Tensor, heads: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """The time step ``clamp(softplus(dt + dt_bias), time_step_limit)`` of ``heads`` from their projection
        [batch, pos, len(heads)] and the log decay ``dt A`` (fp32)."""
        low, high = self.cfg.time_step_limit
        dt = F.softplus(upcast(dt) + upcast(self.dt_bias[heads])).clamp(min=low, max=high)
        return dt, dt * -upcast(self.A_log[heads]).exp()

    def _gated_norm(self, y: Tensor, z: Tensor) -> Tensor:
        """``y * SiLU(z)``, RMS-normalised over each of the n_groups groups of channels, times the weight (fp32)."""
        batch, n_pos = y.shape[:2]
        gated = (upcast(y) * F.silu(upcast(z))).reshape(batch, n_pos, self.cfg.n_groups, -1)
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.cfg.eps)
        return upcast(self.norm_w) * normed.reshape(batch, n_pos, self.cfg.d_inner)


class Mamba2Block(nn.Module):
    """Hooks: ``hook_resid_pre``, ``hook_mixer_out``, ``hook_resid_post``: all [batch, pos, d_model], with
    ``resid_post = resid_pre + mixer_out`` (no MLP). With ``residual_in_fp32`` the residual stream is added in fp32,
    as transformers does; the norm and the mixer run in the weights' dtype."""

    def __init__(self, cfg: HookedMamba2Config, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps)
        self.mixer = Mamba2Mixer(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_mixer_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def mixer_input(self, resid: Tensor) -> Tensor:
        """What the mixer reads: ``ln1(resid)`` in the norm's dtype."""
        return self.ln1(resid.to(self.ln1.w.dtype))

    def forward(self, resid: Tensor, layer_cache: dict | None, pos_offset: int | Tensor) -> Tensor:
        resid = self.hook_resid_pre(resid)
        mixed = self.hook_mixer_out(self.mixer(self.mixer_input(resid), layer_cache))
        if self.residual_in_fp32:
            resid = upcast(resid)
        return self.hook_resid_post(resid + mixed)
