"""One SAE spliced into one hook point (and, for head-indexed SAEs, one head of it).

``SplicedSAE`` holds the SAE (outside the module tree, so that the model's state dict and ``.to()`` leave it alone)
and is itself a module whose children are hook points, so the model's ``setup()`` names them under the hook it is
spliced into:

    plain SAE on ``hook``                 ->  ``{hook}.hook_sae_input``, ``.hook_sae_acts_pre``,
                                              ``.hook_sae_acts_post``, ``.hook_sae_recons``, ``.hook_sae_error``,
                                              ``.hook_sae_output``
    head-indexed SAE on ``hook``, head h  ->  ``{hook}.head{h}.hook_sae_input``, ... (same six names)

The first four are the SAE's own hook points (they fire inside its ``encode`` / ``decode``); ``hook_sae_error`` and
``hook_sae_output`` belong to the splice, which computes the error term itself. With ``use_error_term`` the output is
``reconstruction + (input - clean reconstruction)``, the clean one computed with the SAE's hooks silenced, so that an
intervention on the SAE's features changes the output while the un-intervened output equals the input (up to float
rounding), as in SAELens' ``HookedSAETransformer``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

# the SAE's own hook points that its encode / decode call, re-exposed under the splice's name
SAE_HOOK_NAMES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")
SPLICE_HOOK_NAMES = (*SAE_HOOK_NAMES, "hook_sae_error", "hook_sae_output")


class SplicedSAE(nn.Module):
    """An SAE as it sits in a model: its hook point name, head (or None), meaning and error-term switch."""

    def __init__(self, sae: Any, hook_name: str, head: int | None, mode: str, use_error_term: bool) -> None:
        super().__init__()
        self.__dict__["_sae"] = sae  # not a submodule: no ".sae." in hook names, no parameters in the model
        for name in SAE_HOOK_NAMES:
            self.add_module(name, getattr(sae, name))
        self.hook_sae_error = HookPoint()  # [..., d_in]
        self.hook_sae_output = HookPoint()  # [..., d_in]
        self.hook_name = hook_name
        self.head = head
        self.mode = mode
        self.use_error_term = use_error_term
        self._buffers_for_call: dict[str, Any] = {}  # what the hooks of one forward call share

    @property
    def sae(self) -> Any:
        return self.__dict__["_sae"]

    @property
    def key(self) -> str:
        """The name the model files the splice under (and the prefix of its hook points)."""
        return self.hook_name if self.head is None else f"{self.hook_name}.head{self.head}"

    def hook_points(self) -> dict[str, HookPoint]:
        return {name: getattr(self, name) for name in SPLICE_HOOK_NAMES}

    def reconstruct(self, x: Tensor) -> Tensor:
        """The splice's output for SAE inputs ``x`` [..., d_in] (in x's dtype): the reconstruction, plus the error
        term when it is on. Every hook point of the splice fires once."""
        sae = self.sae
        sae_in = x.to(sae.dtype)
        out = sae.decode(sae.encode(sae_in))
        if self.use_error_term:
            with torch.no_grad(), silenced(sae.hook_dict.values() if hasattr(sae, "hook_dict") else self._sae_points()):
                clean = sae.decode(sae.encode(sae_in))
            out = out + self.hook_sae_error(sae_in - clean)
        return self.hook_sae_output(out).to(x.dtype)

    def _sae_points(self) -> list[HookPoint]:
        return [getattr(self.sae, name) for name in SAE_HOOK_NAMES]


@contextlib.contextmanager
def silenced(hook_points, keep: set[int] = frozenset()):
    """Hook points whose forward hooks are switched off inside the block (except the torch hook ids in ``keep``) and
    restored afterwards, even when the block raises."""
    saved = []
    for point in hook_points:
        saved.append((point, point._forward_hooks))
        point._forward_hooks = OrderedDict((i, h) for i, h in point._forward_hooks.items() if i in keep)
    try:
        yield
    finally:
        for point, hooks in saved:
            point._forward_hooks = hooks
