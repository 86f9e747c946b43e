"""``RecurrentActivationCache``: TransformerLens' ``ActivationCache`` over a recurrent model's hooks.

``run_with_cache`` returns this class, a subclass of ``transformer_lens.ActivationCache`` (``isinstance`` holds), so
``cache["resid_pre", 0]``, ``remove_batch_dim``, ``apply_slice_to_batch_dim``, ``toggle_autodiff``,
``stack_activation``, ``accumulated_resid``, ``apply_ln_to_stack`` and ``logit_attrs`` are TransformerLens' own code.
Two things differ, because a recurrent block is not an attention block:

- ``decompose_resid`` reads each block's sequence mixer from the hook the block really has (``hook_mixer_out`` for a
  recurrent layer, ``hook_attn_out`` for an attention layer) and its MLP from ``hook_mlp_out`` where there is one
  (Mamba-2 blocks have none). ``mode="attn"`` keeps the sequence mixers, ``mode="mlp"`` the MLPs. Labels name the
  hook: ``"{l}_mixer_out"``, ``"{l}_attn_out"``, ``"{l}_mlp_out"``.
- The head- and neuron-level decompositions (``compute_head_results``, ``stack_head_results``,
  ``get_full_resid_decomposition``, ``get_neuron_results``, ``stack_neuron_results``) and TransformerLens' bridge-only
  SSM helpers refuse with the reason: they need per-head attention results ``hook_result`` and ``W_O``/``W_out``
  weights in TransformerLens' layout, which a recurrent mixer does not have. The state itself is cached under
  ``blocks.{l}.mixer.hook_state``.
"""

from __future__ import annotations

import torch
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities.slice import Slice


class RecurrentActivationCache(ActivationCache):
    """TransformerLens' activation cache, with the residual decomposition of recurrent blocks (see module doc)."""

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",  # "all", "mlp" or "attn" (checked below, with a clear error)
        apply_ln: bool = False,
        pos_slice=None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ):
        """The residual stream entering ``layer`` (default: the final one) as a stack
        ``[component, *batch_and_pos, d_model]`` of the embedding and each earlier block's outputs; the stack sums to
        ``resid_pre`` of ``layer`` (``resid_mid`` with ``mlp_input=True``, which adds that block's sequence mixer)."""
        if mode not in ("all", "mlp", "attn"):
            raise ValueError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        n_layers = self.model.cfg.n_layers
        layer = n_layers if layer is None or layer == -1 else layer
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer={layer} is outside [0, {n_layers}]")
        if mlp_input and layer == n_layers:
            raise ValueError("mlp_input=True needs a layer below n_layers (the final stream has no MLP input)")
        components, labels = [], []
        if incl_embeds and self.has_embed:
            components.append(self["hook_embed"])
            labels.append("embed")
        for index in range(layer + 1 if mlp_input else layer):
            parts = []
            if mode != "mlp":
                parts.append(self._mixer_output_name(index))
            if mode != "attn" and index < layer and f"blocks.{index}.hook_mlp_out" in self.model.hook_dict:
                parts.append(f"blocks.{index}.hook_mlp_out")
            for name in parts:
                components.append(self[name])
                labels.append(f"{index}_{name.rsplit('hook_', 1)[1]}")
        if not components:
            raise ValueError("decompose_resid found no component to stack (nothing cached before this layer?)")
        stack = torch.stack([pos_slice.apply(c, dim=-2) for c in components], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input,
                                           has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    def _mixer_output_name(self, layer: int) -> str:
        for slot in ("hook_mixer_out", "hook_attn_out"):
            name = f"blocks.{layer}.{slot}"
            if name in self.model.hook_dict:
                return name
        raise KeyError(f"block {layer} has neither hook_mixer_out nor hook_attn_out")

    def _refuse(self, what: str):
        raise NotImplementedError(
            f"{what} is not available on {type(self.model).__name__}: it needs TransformerLens' per-head attention "
            "results (hook_result) and W_O / W_out weights in its layout, which recurrent mixers do not have. Use "
            "decompose_resid (one component per block output) or the mixer's hooks (blocks.{l}.mixer.hook_state, "
            "hook_read); see docs/hooks.md, 'ActivationCache'."
        )

    def compute_head_results(self, *args, **kwargs):
        self._refuse("compute_head_results")

    def stack_head_results(self, *args, **kwargs):
        self._refuse("stack_head_results")

    def get_full_resid_decomposition(self, *args, **kwargs):
        self._refuse("get_full_resid_decomposition")

    def get_neuron_results(self, *args, **kwargs):
        self._refuse("get_neuron_results")

    def stack_neuron_results(self, *args, **kwargs):
        self._refuse("stack_neuron_results")

    def compute_ssm_state(self, *args, **kwargs):
        raise NotImplementedError("compute_ssm_state belongs to TransformerLens' bridge models; here the state is "
                                  "cached directly: cache['blocks.{l}.mixer.hook_state'] [batch, pos, head, d_k * d_v]")

    def compute_ssm_effective_attention(self, *args, **kwargs):
        raise NotImplementedError("compute_ssm_effective_attention belongs to TransformerLens' bridge models; it is "
                                  "not implemented for the write-interface mixers")
