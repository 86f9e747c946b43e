"""The write interface every recurrent family shares: hook points on the rank-1 write and the edits they allow.

A family's mixer (Gated DeltaNet, Mamba-2, ...) computes its per-token factors and calls
``MatrixWriteMixer.run_recurrence``; this base class owns the hook points below, so every family exposes the same
names under ``blocks.{l}.mixer`` and the same edit semantics.

| hook                   | shape                               | meaning                                                     |
|------------------------|-------------------------------------|-------------------------------------------------------------|
| ``hook_write_k``       | [batch, pos, head, d_k]             | key of the write ``k_t`` (key heads repeated to value heads)|
| ``hook_write_v``       | [batch, pos, head, d_v]             | value of the write ``v_t``                                  |
| ``hook_write_beta``    | [batch, pos, head]                  | write strength ``beta_t``: the write is ``beta_t k_t v_t^T``|
| ``hook_decay``         | [batch, pos, head]                  | log decay ``g_t``; ``a_t = exp(g_t)``                       |
| ``hook_read_q``        | [batch, pos, head, d_k]             | query of the read ``q_t``                                   |
| ``hook_write_add``     | sparse [batch, pos, head, d_k, d_v] | matrices added to the write at t (the read at t sees them)  |
| ``hook_state``         | [batch, pos, head, d_k * d_v]       | ``S_t`` after the write at t, row-major ``[d_k, d_v]``      |
| ``hook_post_read_add`` | sparse [batch, pos, head, d_k, d_v] | matrices added to ``S_t`` after the read at t               |
| ``hook_read``          | [batch, pos, head, d_v]             | ``o_t = S_t^T q_t``                                         |

Edit semantics (checked against a token-by-token reference in the tests):

- Editing ``hook_write_k``, ``hook_write_v`` or ``hook_write_beta`` replaces only the additive write term
  ``beta_t k_t v_t^T`` at the edited cells; the transition keeps the model's own key and strength (for the delta
  rule: ``a_t (I - beta_t k_t k_t^T)``). So substituting an atom ``c p q^T`` for the write is ``k := p, v := q,
  beta := c`` and deleting the write is ``beta := 0``. The recurrence continues from the edited state.
- Editing ``hook_decay`` changes the transition; editing ``hook_read_q`` changes the reads.
- ``hook_write_add`` / ``hook_post_read_add`` receive an empty sparse COO tensor (3 sparse dims, 2 dense dims); a hook
  returns it plus a sparse tensor holding the matrices to add. Memory grows with the number of edited cells.
  ``hook_post_read_add`` is the timing of a cache edit between two decoding steps: the read at t is unchanged and
  every later position starts from the edited state.
- Editing ``hook_state`` at a cell replaces the state there (the read at t sees the replacement) and the recurrence
  continues from it. Cells whose value a hook leaves unchanged keep following the recurrence. The state trajectory is
  materialised only when ``hook_state`` has hooks.
- ``hook_read`` edits change the layer's output only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..ops.adjoint import dplr_form, state_adjoint
from ..ops.finite import all_finite
from ..ops.gated_delta import recurrence
from ..ops.shared_step import shared_step_reads
from ..ops.state_edits import StateEdits, propagate_edits, validate_edits
from .cache import give_rows_their_states, keeps_shared_states, mark_spent
from .padding import pad_mask
from .state_gradients import UnchangedCells, link_unchanged_cells, needs_link, untaped_trajectory
from ..ops.precision import upcast

WRITE_HOOK_NAMES = (
    "hook_write_k",
    "hook_write_v",
    "hook_write_beta",
    "hook_decay",
    "hook_read_q",
    "hook_write_add",
    "hook_state",
    "hook_post_read_add",
    "hook_read",
)
SPARSE_HOOK_NAMES = ("hook_write_add", "hook_post_read_add")


class MatrixWriteMixer(nn.Module):
    """Base of the recurrent mixers. Subclasses set ``delta_rule`` (whether the transition erases along the write key
    with the write strength, as in Gated DeltaNet) and call ``run_recurrence``."""

    delta_rule: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.hook_write_k = HookPoint()  # [batch, pos, head, d_k]
        self.hook_write_v = HookPoint()  # [batch, pos, head, d_v]
        self.hook_write_beta = HookPoint()  # [batch, pos, head]
        self.hook_decay = HookPoint()  # [batch, pos, head]
        self.hook_read_q = HookPoint()  # [batch, pos, head, d_k]
        self.hook_write_add = HookPoint()  # sparse [batch, pos, head, d_k, d_v]
        self.hook_state = HookPoint()  # [batch, pos, head, d_k * d_v]
        self.hook_post_read_add = HookPoint()  # sparse [batch, pos, head, d_k, d_v]
        self.hook_read = HookPoint()  # [batch, pos, head, d_v]

    def run_recurrence(
        self,
        read_q: Tensor,  # [batch, pos, head, d_k]
        write_k: Tensor,  # [batch, pos, head, d_k]
        write_v: Tensor,  # [batch, pos, head, d_v]
        write_beta: Tensor,  # [batch, pos, head]
        log_decay: Tensor,  # [batch, pos, head] (or per key channel, [batch, pos, head, d_k], for DPLR mixers)
        initial_state: Tensor | None,  # [batch, head, d_k, d_v]
        state_positions: Tensor | None = None,  # [n_sel]
        **transition_factors: Tensor,  # a family's extra transition factors, each shown to hook_{name}
    ):
        """Apply the write hooks, run the recurrence with every edit, return (reads [b, p, h, d_v], final state),
        and with ``state_positions`` also the unedited states there ``[b, n_sel, h, d_k, d_v]`` (cache snapshots)."""
        batch, n_pos, n_heads, d_k = write_k.shape
        d_v = write_v.shape[-1]
        native_k = write_k.clone() if self.hook_write_k.has_hooks() else write_k
        native_beta = write_beta.clone() if self.hook_write_beta.has_hooks() else write_beta

        key = _hooked(self.hook_write_k, write_k)
        value = _hooked(self.hook_write_v, write_v)
        beta = _hooked(self.hook_write_beta, write_beta)
        log_decay = _hooked(self.hook_decay, log_decay)
        extras = {name: _hooked(getattr(self, f"hook_{name}"), f) for name, f in transition_factors.items()}
        query = _hooked(self.hook_read_q, read_q)
        transition = self._transition(native_k, native_beta, log_decay, extras)

        # The write k u^T with u = beta v. Where the transition erases along the write key (the delta rule) and the
        # key itself was edited, the write leaves the transition's key: it is removed from the chunked run and
        # re-added as an exact sparse edit.
        write_value = upcast(beta)[..., None] * upcast(value)
        key_edits = key_cells = None
        if self.write_key_in_transition and key is not native_k:
            moved = (key != native_k).any(-1)  # [batch, pos, head]
            if needs_link(key):  # the unmoved cells are not read below: link them for gradients
                key_cells = UnchangedCells(upcast(key), upcast(native_k), ~moved)
                key_value = write_value
            if bool(moved.any()):
                b, p, h = moved.nonzero(as_tuple=True)
                key_edits = StateEdits.build(b, p, h, upcast(key[b, p, h])[:, :, None] * write_value[b, p, h][:, None, :])
                write_value = write_value.masked_fill(moved[..., None], 0.0)
            key = native_k

        shape5 = (batch, n_pos, n_heads, d_k, d_v)
        added = _sparse_edits(self.hook_write_add, shape5, after_read=False, device=write_k.device)
        post_read = _sparse_edits(self.hook_post_read_add, shape5, after_read=True, device=write_k.device)
        edits = StateEdits.concat(key_edits, added, post_read)
        for e in (added, post_read):
            if e is not None:
                validate_edits(e, batch, n_pos, n_heads, d_k, d_v)

        want_states = self.hook_state.has_hooks()
        if state_positions is not None:
            if edits is not None or want_states:
                raise ValueError("cache snapshots are taken on an unedited pass: remove this layer's edit hooks")
            reads, final, picked = self._recurrence(query, key, write_value, transition, initial_state,
                                                    state_positions=state_positions)
            return _hooked(self.hook_read, reads), final, picked
        run_base = lambda trajectory: self._recurrence(  # noqa: E731
            query, key, write_value, transition, initial_state, return_trajectory=trajectory
        )
        n_factors = len(transition)

        def trajectory_only(q, k, u, initial, *factors):  # [b, p, h, d_k, d_v]
            return self._recurrence(q, k, u, factors[:n_factors], initial, return_trajectory=True)[2]

        with _with_version_counters(want_states):
            if want_states and torch.is_grad_enabled():  # the reads with autograd, the states off its tape
                reads, final, _ = run_base(False)
                base_traj = untaped_trajectory(trajectory_only, query, key, write_value, initial_state, *transition)
            else:
                reads, final, base_traj = run_base(want_states)
        state_cells = None
        if want_states:
            edits, state_cells = self._apply_state_hook(
                query, transition, edits, base_traj,
                lambda: untaped_trajectory(trajectory_only, query, key, write_value, initial_state, *transition))
        if edits is not None:
            read_delta, final_delta, _ = self._propagate(query, transition, edits)
            reads = reads + read_delta
            final = final + final_delta
        if state_cells is not None or key_cells is not None:
            cuts = None if state_cells is None else ~state_cells.kept

            def adjoint(grad_reads: Tensor, grad_final: Tensor) -> Tensor:
                return state_adjoint(query, grad_reads, grad_final, *self._dplr_transition(transition), cuts=cuts)

            reads, final = link_unchanged_cells(reads, final, adjoint, state_cells, key_cells,
                                                key_value if key_cells is not None else None)
        reads = _hooked(self.hook_read, reads)
        return reads, final

    @property
    def output_projection(self) -> nn.Linear:
        """The linear map from the heads' (normed, gated) reads ``[.., n_heads * d_v]`` to the residual stream; head h
        feeds its columns ``h * d_v .. (h + 1) * d_v - 1``. Families name it ``out_proj`` unless they override this."""
        return self.out_proj

    has_head_write_factors = False  # whether head_write_factors is implemented

    def head_write_factors(self, x: Tensor, head: int) -> dict[str, Tensor]:
        """One head's write factors ``write_k`` [batch, pos, 1, d_k], ``write_v`` [batch, pos, 1, d_v],
        ``write_beta`` and ``decay`` [batch, pos, 1] (and the family's transition factors), as the forward pass
        computes them from the mixer input ``x``, but from that head's projections only (families that can set
        ``has_head_write_factors``; the others' factors are captured from a forward pass). The substitution test's
        scan uses it."""
        raise NotImplementedError(f"{type(self).__name__} has no head_write_factors; capture the write hooks instead")

    # ---- the family's recurrence: Gated DeltaNet and Mamba-2 here, overridden by DPLRWriteMixer ----------------
    write_key_in_transition = True  # the chunked recurrence writes along the key its transition erases along
    transition_factor_names: tuple[str, ...] = ()  # extra transition factors, each with a hook point hook_{name}

    def _transition(self, native_k: Tensor, native_beta: Tensor, log_decay: Tensor, extras: dict) -> tuple:
        """The transition's factors: (log decay, erase key, erase strength or None)."""
        return log_decay, native_k, (native_beta if self.delta_rule else None)

    def _recurrence(self, query, key, write_value, transition, initial_state, return_trajectory=False,
                    state_positions=None):
        log_decay, _, erase = transition
        return recurrence(query, key, write_value, log_decay, erase, initial_state,
                          return_trajectory=return_trajectory, state_positions=state_positions)

    def _propagate(self, query, transition, edits, return_trajectory=False):
        log_decay, erase_key, erase = transition
        return propagate_edits(query, erase_key, log_decay, erase, edits, return_trajectory=return_trajectory)

    def _dplr_transition(self, transition) -> tuple:
        """The transition as ``(w, ea, eb)`` of ``diag(exp(w)) - ea eb^T`` (for the adjoint; ``ops.adjoint``)."""
        log_decay, erase_key, erase = transition
        return dplr_form(log_decay, erase_key, erase)

    def recur_with_cache(self, read_q, write_k, write_v, write_beta, log_decay, layer_cache: dict | None,
                         **transition_factors) -> Tensor:
        """``run_recurrence`` from the cached state, storing the final state back (and, when the cache requests
        snapshots, the states before each requested position: ``layer_cache["snapshots"]["state"]``
        [batch, n_sel, head, d_k, d_v], position 0 being the state the call started from; the positions are
        ``[n_sel]`` or per row ``[batch, n_sel]``). Returns the reads."""
        snapshot_at = layer_cache.get("snapshot_at") if layer_cache is not None else None
        pad = pad_mask(layer_cache)
        if keeps_shared_states(layer_cache):
            one_step = write_k.shape[1] == 1 and snapshot_at is None and pad is None
            if "state_shared" in layer_cache and one_step and not self._has_any_hooks():
                return self._shared_step(read_q, write_k, write_v, write_beta, log_decay, layer_cache,
                                         transition_factors)
            give_rows_their_states(layer_cache)
        initial = layer_cache.get("state") if layer_cache is not None else None
        if pad is not None:  # left pads: zero write, identity transition (zero log decay and extra factors)
            write_beta = write_beta.masked_fill(pad[..., None], 0.0)
            log_decay = log_decay.masked_fill(pad.reshape(*pad.shape, *[1] * (log_decay.dim() - 2)), 0.0)
            transition_factors = {n: f.masked_fill(pad[..., None, None], 0.0) for n, f in transition_factors.items()}
        factors = (read_q, write_k, write_v, write_beta, log_decay, initial)
        if snapshot_at is None:
            reads, final = self.run_recurrence(*factors, **transition_factors)
        else:
            reads, final, picked = self.run_recurrence(*factors, (snapshot_at - 1).clamp(min=0), **transition_factors)
            start = initial if initial is not None else torch.zeros_like(final)
            at_start = (snapshot_at == 0).to(picked.device).expand(picked.shape[:2])[..., None, None, None]
            layer_cache.setdefault("snapshots", {})["state"] = torch.where(at_start, start[:, None], picked)
            layer_cache["snapshot_len"] = write_k.shape[1]
        if layer_cache is not None:
            layer_cache["state"] = final
        return reads

    def _has_any_hooks(self) -> bool:
        names = (*WRITE_HOOK_NAMES, *(f"hook_{name}" for name in self.transition_factor_names))
        return any(getattr(self, name).has_hooks() for name in names)

    def _shared_step(self, read_q, write_k, write_v, write_beta, log_decay, layer_cache: dict,
                     transition_factors: dict) -> Tensor:
        """The reads [rows, 1, head, d_v] of a one-token call from shared snapshot states (``ops.shared_step``; no
        hooks on this mixer). No final state is computed: the layer is marked spent."""
        transition = self._transition(write_k, write_beta, log_decay, transition_factors)
        w, erase_a, erase_b = (None if f is None else f[:, 0] for f in self._dplr_transition(transition))
        edit_head, edit = layer_cache.get("state_edit", (None, None))
        write_value = upcast(write_beta[:, 0])[..., None] * upcast(write_v[:, 0])  # [rows, head, d_v]
        reads = shared_step_reads(read_q[:, 0], write_k[:, 0], write_value, w, erase_a, erase_b,
                                  layer_cache["state_shared"], layer_cache["state_source"], edit, edit_head)
        mark_spent(layer_cache)
        return reads[:, None]

    def _apply_state_hook(self, query, transition, edits, base_traj, rebuild_base) -> tuple:
        """Show ``hook_state`` the states the reads see; turn the cells its hooks change into assign edits. Returns
        (all edits or None, the unchanged cells to link for gradients or None: ``state_gradients``).

        No copy of the trajectory is kept for the comparison: a hook that returns a new tensor leaves the shown one
        intact, and one that edits in place is detected by the tensor's version counter, after which the unedited
        trajectory is recomputed (one more pass of the recurrence, only in that case). Under ``torch.inference_mode``
        the shown states are built as normal tensors (``_with_version_counters``), so the same check applies there.
        """
        batch, n_pos, n_heads, d_k, d_v = base_traj.shape
        correction = None
        if edits is not None:
            correction = self._propagate(query, transition, edits, return_trajectory=True)[2]
        if correction is None:
            shown = base_traj
        else:
            with _with_version_counters(True):
                shown = base_traj + correction
        flat = shown.reshape(batch, n_pos, n_heads, d_k * d_v)
        version = flat._version
        hooked = self.hook_state(flat)
        edited_in_place = flat._version != version
        if hooked is flat and not edited_in_place:  # nobody edited the states
            if not needs_link(flat):
                return edits, None
            # gradients: the states shown are what the reads see (``shown`` is another node than ``flat``)
            every_cell = flat.new_ones(flat.shape[:3], dtype=torch.bool)
            return edits, UnchangedCells(flat.reshape(shown.shape), shown, every_cell)
        hooked = _checked_shape(hooked, flat.shape, "hook_state").reshape(batch, n_pos, n_heads, d_k, d_v)
        hooked = upcast(hooked)
        if edited_in_place:  # the shown tensor was overwritten: rebuild it
            if correction is None:
                base_traj = shown = rebuild_base()
            else:
                shown = base_traj + correction
        changed = (hooked != shown).flatten(-2).any(-1)  # [batch, pos, head]
        cells = UnchangedCells(hooked, shown, ~changed) if needs_link(hooked) else None
        if not bool(changed.any()):
            return edits, cells
        b, p, h = changed.nonzero(as_tuple=True)
        if not torch.isfinite(hooked[b, p, h]).all():
            raise ValueError("a hook on hook_state returned non-finite values")
        # The edited state at a replaced cell is S' = base + correction, so the correction there becomes S' - base.
        assigns = StateEdits.build(b, p, h, hooked[b, p, h] - base_traj[b, p, h], assign=True)
        return StateEdits.concat(edits, assigns), cells


@contextlib.contextmanager
def _with_version_counters(active: bool = True):
    """Under ``torch.inference_mode`` (and ``active``), make the tensors created inside normal ones, whose version
    counters reveal in-place edits by hooks; gradients stay off. Elsewhere a no-op."""
    if active and torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            yield
    else:
        yield


def run_hook_keeping_shape(hook_point: HookPoint, tensor: Tensor) -> Tensor:
    """Run a hook point; a hook that changes the shape gets an error instead of a silent broadcast."""
    out = hook_point(tensor)
    return out if out is tensor else _checked_shape(out, tensor.shape, hook_point.name)


def _hooked(hook_point: HookPoint, tensor: Tensor) -> Tensor:
    """Run a write-interface hook point; when hooks are attached, also check that they returned finite values."""
    out = run_hook_keeping_shape(hook_point, tensor)
    if hook_point.has_hooks() and not all_finite(out):
        raise ValueError(f"a hook on {hook_point.name} returned non-finite values")
    return out


def _checked_shape(tensor: Tensor, shape: torch.Size, name: str) -> Tensor:
    if not isinstance(tensor, Tensor) or tuple(tensor.shape) != tuple(shape):
        got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"a hook on {name} returned {got}; it must keep the shape {tuple(shape)}")
    return tensor


def empty_sparse_edits(shape5: tuple[int, ...], device) -> Tensor:
    """The empty sparse tensor shown to ``hook_write_add`` / ``hook_post_read_add``."""
    batch, n_pos, n_heads, d_k, d_v = shape5
    indices = torch.zeros(3, 0, dtype=torch.long, device=device)
    values = torch.zeros(0, d_k, d_v, device=device)
    return torch.sparse_coo_tensor(indices, values, shape5, device=device, check_invariants=False)


def _sparse_edits(hook: HookPoint, shape5, after_read: bool, device) -> StateEdits | None:
    if not hook.has_hooks():
        return None
    out = hook(empty_sparse_edits(shape5, device))
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(shape5):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"a hook on {hook.name} returned {got}; it must return a tensor of shape {tuple(shape5)}")
    if not out.is_sparse:
        out = out.to_sparse(sparse_dim=3)
    if out.sparse_dim() != 3:
        raise ValueError(f"{hook.name} edits must be sparse over (batch, pos, head) with dense (d_k, d_v) matrices")
    out = out.coalesce()
    indices, values = out.indices(), out.values()
    if values.shape[0] == 0:
        return None
    if not all_finite(values):  # the chunked algebra would spread NaN / inf to positions before the edit
        raise ValueError(f"a hook on {hook.name} returned non-finite edit matrices (NaN or inf); edits must be finite")
    return StateEdits.build(indices[0], indices[1], indices[2], values, after_read=after_read)
