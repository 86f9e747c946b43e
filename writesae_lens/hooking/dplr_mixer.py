"""The write interface on a diagonal-plus-low-rank transition (RWKV-7): same hook names, same edit semantics.

Per head, with state ``S`` of shape ``[d_k, d_v]`` (key axis first):

    S_t = (diag(exp(decay_t)) - ea_t eb_t^T) S_{t-1} + beta_t k_t v_t^T,     read_t = S_t^T q_t

(``writesae_lens.ops.dplr``). RWKV-7 has no write strength: the model's own ``beta_t`` is 1, and ``hook_write_beta``
shows ones so that the write edits of every family read the same (delete the write: ``beta := 0``; substitute an atom
``c p q^T``: ``k := p, v := q, beta := c``).

| hook                   | shape                               | meaning                                                     |
|------------------------|-------------------------------------|-------------------------------------------------------------|
| ``hook_write_k``       | [batch, pos, head, d_k]             | key of the write ``k_t`` (RWKV-7: ``k`` after ``k_a``)      |
| ``hook_write_v``       | [batch, pos, head, d_v]             | value of the write ``v_t`` (RWKV-7: after the v-first lerp) |
| ``hook_write_beta``    | [batch, pos, head]                  | write strength, ones in the model                           |
| ``hook_decay``         | [batch, pos, head, d_k]             | log decay per key channel ``w_t`` (``<= 0``)                |
| ``hook_erase_a``       | [batch, pos, head, d_k]             | ``ea_t``: where the erase removes (RWKV-7: ``kk * a``)      |
| ``hook_erase_b``       | [batch, pos, head, d_k]             | ``eb_t``: what the erase reads (RWKV-7: ``kk``)             |
| ``hook_read_q``        | [batch, pos, head, d_k]             | query of the read ``q_t`` (RWKV-7: ``r``, unscaled)         |
| ``hook_write_add``     | sparse [batch, pos, head, d_k, d_v] | matrices added to the write at t (the read at t sees them)  |
| ``hook_state``         | [batch, pos, head, d_k * d_v]       | ``S_t`` after the write at t, row-major ``[d_k, d_v]``      |
| ``hook_post_read_add`` | sparse [batch, pos, head, d_k, d_v] | matrices added to ``S_t`` after the read at t               |
| ``hook_read``          | [batch, pos, head, d_v]             | ``o_t = S_t^T q_t``                                         |

Edit semantics are those of ``MatrixWriteMixer``. The write key is not part of the transition here (the erase has
its own factors), so editing ``hook_write_k``, ``hook_write_v`` or ``hook_write_beta`` replaces only ``beta_t k_t v_t^T``
with nothing else to keep apart; editing ``hook_decay``, ``hook_erase_a`` or ``hook_erase_b`` changes the transition.
Order inside the layer: write hooks, ``hook_decay``, ``hook_erase_a``, ``hook_erase_b``, ``hook_read_q``,
``hook_write_add``, ``hook_post_read_add``, ``hook_state``, ``hook_read``.
"""

from __future__ import annotations

from torch import Tensor
from transformer_lens.hook_points import HookPoint

from ..ops.dplr import dplr_recurrence, propagate_dplr_edits
from .write_mixer import MatrixWriteMixer


class DPLRWriteMixer(MatrixWriteMixer):
    """Base of the DPLR mixers (RWKV-7). Subclasses compute the per-token factors and call ``recur_with_cache``
    (or ``run_recurrence``) with the erase factors as keyword arguments ``erase_a=..., erase_b=...``; the hooks, the
    edits and the caching are ``MatrixWriteMixer``'s, only the recurrence and the edit propagation differ."""

    delta_rule = False  # the transition does not erase along the write key
    write_key_in_transition = False  # write-key edits need no special handling
    transition_factor_names = ("erase_a", "erase_b")

    def __init__(self) -> None:
        super().__init__()
        self.hook_erase_a = HookPoint()  # [batch, pos, head, d_k]
        self.hook_erase_b = HookPoint()  # [batch, pos, head, d_k]

    def _transition(self, native_k: Tensor, native_beta: Tensor, log_decay: Tensor, extras: dict) -> tuple:
        """(per-channel log decay, erase_a, erase_b): the write key and strength are not part of it."""
        return log_decay, extras["erase_a"], extras["erase_b"]

    def _recurrence(self, query, key, write_value, transition, initial_state, return_trajectory=False,
                    state_positions=None):
        return dplr_recurrence(query, key, write_value, *transition, initial_state,
                               return_trajectory=return_trajectory, state_positions=state_positions)

    def _propagate(self, query, transition, edits, return_trajectory=False):
        return propagate_dplr_edits(query, *transition, edits, return_trajectory=return_trajectory)

    def _dplr_transition(self, transition) -> tuple:
        return transition  # already (w, ea, eb)
