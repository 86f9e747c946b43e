"""Perturb one head's state at t0 and read the logits at a prompt's last position t = t0 + h: exactly, batched,
and to first order (forward-mode JVP), on every family.

Semantics: the perturbation ``M`` (``[d_k, d_v]``) is added to the state ``S_{t0}`` after the write at t0, so the read
at t0 already sees it (``o_{t0} += M^T q_{t0}``) and every later state inherits it through the recurrence; with
h = 0 the read at t itself is the only one that changes. This is ``interventions.add_to_state(layer, (row, t0,
head), M, timing="write")`` on the whole prompt, which the tests check record by record.

How it is batched: the layers before the perturbed one run once per prompt (their output is kept); one native pass
per group of prompts from the perturbed layer keeps cache snapshots at every t0 (states only there); then any number
of rows (prompt, M) per horizon run from their snapshot, in two steps: position t0 alone with the read edited through
``hook_read``, then the state edited in the cache and positions t0+1..t. No prefix is re-run and no cache is copied.
The unperturbed logits come from rows with ``M = 0`` through the same computation, so any rounding the row path adds
cancels in the shifts. The native passes and the rows run the perturbed layer, the later layers, the final norm and the
unembedding in float32 whatever the model's dtype (``precision="float32"``, ``tail_precision.py``): a bfloat16 model's
logits are rounded at about 0.03 for logits near 10, far above the shifts the closed form predicts (issue #18). The first-order shift is the forward-mode JVP (dual numbers, ``torch.autograd.forward_ad``)
of the same computation at ``M = 0`` along ``M``
(attention through the math kernel there: the fused CPU kernel has no forward-mode derivative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..hooking.cache import RecurrentCache
from ..interventions import mixer_hook
from ..ops.precision import upcast
from .firings import capture_until
from .tail_precision import as_tail_input, comparison_model


@dataclass
class PromptGroup:
    """Prompts that share one native pass: their inputs at the layer and the cache holding their snapshots."""

    prompts: list[int]  # prompt indices into the engine's tokens
    snapshots: RecurrentCache  # batch row i = prompts[i]; snapshots at the engine's t0s
    snapshot_of: dict[int, int]  # t0 -> index into the requested snapshot positions


class StatePerturbations:
    """The engine. ``tokens`` ``[n_prompts, n_pos]`` (equal lengths); the logits are read at ``t = n_pos - 1``."""

    def __init__(self, model, layer: int, head: int, tokens: Tensor, horizons: list[int],
                 passage_batch_size: int = 8, precision: str = "float32") -> None:
        self.model, self.layer, self.head = model, layer, head
        self.runner = comparison_model(model, layer, precision)  # what runs from the layer on
        self.dtype = next(self.runner.blocks[layer].parameters()).dtype
        self.tokens = tokens
        self.t = tokens.shape[1] - 1
        self.horizons = sorted(set(horizons))
        self.passage_batch_size = passage_batch_size
        self.inputs = self._capture_inputs()

    # ---- what the layer sees, once per prompt ---------------------------------------------------------------------
    @torch.no_grad()
    def _capture_inputs(self) -> dict[str, Tensor]:
        """Per prompt, the streams a run from the layer takes (``resid`` and carried streams, [n, pos, ...]) and the
        head's read query ``query`` [n, pos, d_k], log decay ``log_decay`` [n, pos] (or [n, pos, d_k]) and native
        write norm ``write_norm`` [n, pos] (``||beta k v^T||_F``)."""
        model, layer, head = self.model, self.layer, self.head
        names = {name: mixer_hook(layer, f"hook_{name}") for name in ("read_q", "decay", "write_k", "write_v",
                                                                        "write_beta")}
        streams = {"resid": f"blocks.{layer}.hook_resid_pre", **model.carried_streams}
        parts: list[dict[str, Tensor]] = []
        for start in range(0, self.tokens.shape[0], self.passage_batch_size):
            got = capture_until(model, self.tokens[start : start + self.passage_batch_size],
                                [*names.values(), *streams.values()], mixer_hook(layer, "hook_read"))
            of = {name: upcast(got[hook][:, :, head]) for name, hook in names.items()}
            part = {stream: as_tail_input(got[hook], self.dtype) for stream, hook in streams.items()}
            part["query"], part["log_decay"] = of["read_q"], of["decay"]
            part["write_norm"] = of["write_beta"].abs() * of["write_k"].norm(dim=-1) * of["write_v"].norm(dim=-1)
            parts.append(part)
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def stream_names(self) -> tuple[str, ...]:
        return ("resid", *self.model.carried_streams)

    # ---- native passes --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def groups(self):
        """One ``PromptGroup`` per ``passage_batch_size`` prompts, with snapshots at every t0 = t - h."""
        starts = sorted({self.t - h for h in self.horizons})
        for first in range(0, self.tokens.shape[0], self.passage_batch_size):
            prompts = list(range(first, min(first + self.passage_batch_size, self.tokens.shape[0])))
            cache = self.model.empty_cache()
            cache.request_snapshots(starts, range(self.layer, self.model.cfg.n_layers))
            streams = {name: self.inputs[name][prompts, : max(starts)] for name in self.stream_names()}
            if max(starts) == 0:  # a one-token prompt: nothing to run before t0
                streams = {name: self.inputs[name][prompts, :1] for name in self.stream_names()}
            self._run(streams, cache, final_positions=torch.zeros(len(prompts), 1, dtype=torch.long))
            yield PromptGroup(prompts, cache, {s: i for i, s in enumerate(starts)})

    # ---- perturbed rows -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, group: PromptGroup, horizon: int, rows: Tensor, perturbations: Tensor) -> Tensor:
        """Logits ``[rows, d_vocab]`` (fp32; fp64 for a float64 model) at t of the group's prompts ``rows`` (indices into ``group.prompts``)
        with ``S_{t0}`` of the head perturbed by ``perturbations`` ``[rows, d_k, d_v]`` (zeros: native)."""
        return self._perturbed(group, horizon, rows)(upcast(perturbations))

    @torch.no_grad()  # forward mode needs no graph
    def first_order(self, group: PromptGroup, horizon: int, rows: Tensor,
                    directions: Tensor) -> tuple[Tensor, Tensor]:
        """(logits at M = 0, their derivative along ``directions`` ``[rows, d_k, d_v]``), both ``[rows, d_vocab]``: the
        exact first-order shift per unit of perturbation (forward mode)."""
        run = self._perturbed(group, horizon, rows)
        directions = upcast(directions)
        with sdpa_kernel([SDPBackend.MATH]), forward_ad.dual_level():  # dual numbers: ~15% faster than func.jvp
            out = forward_ad.unpack_dual(run(forward_ad.make_dual(torch.zeros_like(directions), directions)))
        return out.primal, out.tangent

    def _perturbed(self, group: PromptGroup, horizon: int, rows: Tensor):
        """The function ``M [rows, d_k, d_v] -> logits [rows, d_vocab]`` for these rows at this horizon."""
        if horizon not in self.horizons:
            raise ValueError(f"horizon {horizon} was not prepared; the engine's horizons are {self.horizons}")
        t0 = self.t - horizon
        rows = torch.as_tensor(rows, dtype=torch.long)
        prompts = torch.tensor(group.prompts)[rows]
        which = torch.full_like(rows, group.snapshot_of[t0])
        streams = {name: self.inputs[name][prompts, t0:] for name in self.stream_names()}  # [rows, h + 1, ...]
        layer, head = self.layer, self.head

        def run(perturbations: Tensor) -> Tensor:
            cache = group.snapshots.rows_from_snapshots(which, rows)
            query: dict[str, Tensor] = {}

            def keep_query(q: Tensor, hook) -> None:
                query["q"] = upcast(q[:, 0, head])  # [rows, d_k]

            def edit_read(reads: Tensor, hook) -> Tensor:  # the read at t0 sees the perturbed state: o += M^T q
                delta = torch.einsum("rkv,rk->rv", perturbations, query["q"]).to(reads.dtype)
                per_head = [delta if h == head else torch.zeros_like(delta) for h in range(reads.shape[2])]
                return reads + torch.stack(per_head, dim=1)[:, None]

            hooks = [(mixer_hook(layer, "hook_read_q"), keep_query), (mixer_hook(layer, "hook_read"), edit_read)]
            with self.runner.hooks(fwd_hooks=hooks):
                final = self._run({n: s[:, :1] for n, s in streams.items()}, cache)
            if horizon > 0:
                state = cache.layers[layer]["state"]  # [rows, head, d_k, d_v], S_{t0} as the layer left it
                per_head = [perturbations if h == head else torch.zeros_like(perturbations)
                            for h in range(state.shape[1])]
                cache.layers[layer]["state"] = state + torch.stack(per_head, dim=1).to(state.dtype)
                final = self._run({n: s[:, 1:] for n, s in streams.items()}, cache)
            return upcast(self.runner.unembed(self.runner.ln_final(final[:, -1:]))[:, 0])

        return run

    def _run(self, streams: dict[str, Tensor], cache: RecurrentCache, final_positions: Tensor | None = None) -> Tensor:
        """Final residual [batch, pos, d_model] of a run from the layer (carried streams only after layer 0)."""
        carried = {name: streams[name] for name in self.model.carried_streams} if self.layer > 0 else {}
        return self.runner(streams["resid"], start_at_layer=self.layer, stop_at_layer=self.model.cfg.n_layers,
                           cache=cache, final_positions=final_positions, **carried)
