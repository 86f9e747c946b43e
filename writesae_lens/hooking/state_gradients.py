"""Gradients through the hook points whose output the recurrence does not consume where a hook leaves it unchanged.

``hook_state`` shows the state trajectory and turns only the cells a hook *changes* into edits; the delta-rule mixers
likewise turn only the changed cells of ``hook_write_k`` into exact sparse edits. Where nothing changed, the forward
pass never reads the hook's output, so without help no gradient would reach it: a backward hook would not fire and
an edit ``x + a r`` would have ``d loss / d a = 0`` at ``a = 0``.

``link_unchanged_cells`` returns the reads and final state unchanged (same values) while making them depend, for
autograd, on the hook outputs at the unchanged cells, as if each cell's output minus what the hook was shown were
added to the state at t (before the read at t; the recurrence carries it on):

    hook_state:    S_t += out_t - shown_t                     d loss / d out_t = lam_t
    hook_write_k:  S_t += (out_t - native_t) u_t^T            d loss / d out_t = lam_t u_t

with ``lam_t = d loss / d S_t`` from ``writesae_lens.ops.adjoint.state_adjoint`` (cut at the replaced states). The
shown tensor (and the native key) receive minus the same gradient, so a hook that returns its input unchanged passes
nothing extra to the model's parameters: their gradients stay those of the plain forward pass. At changed cells the
edits themselves carry the gradient. Nothing is computed in the forward pass; the adjoint costs one reversed chunked
recurrence with its trajectory in the backward pass, only when a gradient is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class UnchangedCells:
    """A hook output, what the model would have used there, and the cells ``[batch, pos, head]`` where they agree."""

    out: Tensor  # [batch, pos, head, d_k, d_v] (state) or [batch, pos, head, d_k] (write key)
    shown: Tensor  # same shape
    kept: Tensor  # bool [batch, pos, head]


def needs_link(out: Tensor) -> bool:
    """Whether a hook output takes part in a gradient computation."""
    return torch.is_grad_enabled() and out.requires_grad


def link_unchanged_cells(
    reads: Tensor,  # [batch, pos, head, d_v]
    final: Tensor,  # [batch, head, d_k, d_v]
    adjoint: Callable[[Tensor, Tensor], Tensor],  # (d loss/d reads, d loss/d final) -> lam [batch, pos, head, d_k, d_v]
    state: UnchangedCells | None,
    key: UnchangedCells | None,
    write_value: Tensor | None,  # [batch, pos, head, d_v]: u_t, for the key
) -> tuple[Tensor, Tensor]:
    """(reads, final) with the same values, linked for autograd to the unchanged cells (see the module docstring)."""
    if state is not None and not bool(state.kept.any()):
        state = None
    if key is not None and not bool(key.kept.any()):
        key = None
    if state is None and key is None:
        return reads, final
    parts = [(c.out, c.shown, c.kept) if c is not None else (None, None, None) for c in (state, key)]
    u = write_value.detach() if key is not None else None
    return _Link.apply(adjoint, u, reads, final, *parts[0], *parts[1])


class _Link(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adjoint, u, reads, final, state_out, state_shown, state_kept, key_out, key_shown, key_kept):
        ctx.adjoint = adjoint
        ctx.u = u
        ctx.state_kept, ctx.key_kept = state_kept, key_kept
        ctx.dtypes = tuple(None if x is None else x.dtype for x in (state_out, state_shown, key_out, key_shown))
        return reads.clone(), final.clone()

    @staticmethod
    def backward(ctx, grad_reads, grad_final):
        lam = ctx.adjoint(grad_reads, grad_final)  # [batch, pos, head, d_k, d_v]
        state_grad = key_grad = None
        if ctx.state_kept is not None:
            every = bool(ctx.state_kept.all())
            state_grad = lam if every else lam * ctx.state_kept[..., None, None].to(lam.dtype)
        if ctx.key_kept is not None:
            kept = ctx.key_kept if ctx.state_kept is None else ctx.key_kept & ctx.state_kept  # replaced: hidden
            key_grad = torch.einsum("bphkv,bphv->bphk", lam, ctx.u.to(lam.dtype)) * kept[..., None].to(lam.dtype)
        cast = lambda g, i: None if g is None else g.to(ctx.dtypes[i])  # noqa: E731
        neg = lambda g, i: None if g is None else (-g).to(ctx.dtypes[i])  # noqa: E731
        return (None, None, grad_reads, grad_final,
                cast(state_grad, 0), neg(state_grad, 1), None, cast(key_grad, 2), neg(key_grad, 3), None)


def untaped_trajectory(run: Callable[..., Tensor], *inputs: Tensor | None) -> Tensor:
    """``run(*inputs)``, a state trajectory [batch, pos, head, d_k, d_v], computed without autograd's tape (the
    fast in-place path of the chunked algorithms), yet differentiable: the backward recomputes it with the tape, and
    only when its gradient is not zero. The gradient of the states shown to ``hook_state`` is exactly zero whenever
    the hooks' outputs depend on them as ``x + (something that does not depend on x)``: the link above gives the
    output ``lam`` and the shown states ``-lam``, which cancel exactly. Outside autograd this is ``run(*inputs)``."""
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)):
        return run(*inputs)
    return _Untaped.apply(run, *inputs)


class _Untaped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, *inputs):
        ctx.run = run
        ctx.save_for_backward(*inputs)
        return run(*inputs)

    @staticmethod
    def backward(ctx, grad):
        inputs = ctx.saved_tensors
        wanted = [i for i, x in enumerate(inputs) if x is not None and ctx.needs_input_grad[1 + i]]
        grads = [None] * len(inputs)
        if wanted and bool(torch.count_nonzero(grad)):  # (count_nonzero: no boolean temporary)
            with torch.enable_grad():
                again = [x.detach().requires_grad_() if i in wanted else x for i, x in enumerate(inputs)]
                found = torch.autograd.grad(ctx.run(*again), [again[i] for i in wanted], grad, allow_unused=True)
            for i, g in zip(wanted, found):
                grads[i] = g
        return (None, *grads)
