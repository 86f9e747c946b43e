"""SAEs spliced into a hooked model, in the manner of SAELens' ``HookedSAETransformer``: ``add_sae``, ``reset_saes``,
``saes()``, ``run_with_saes``, ``run_with_cache_with_saes``, ``run_with_hooks_with_saes`` (see docs/splicing.md).

An SAE is placed by its metadata: ``hook_name`` and, for head-indexed SAEs, ``hook_head_index``. On a recurrent
layer's ``hook_state`` the SAE encodes one head's state, and the splice has one of two meanings (``mode``):

- ``"read"``: the head reads the reconstruction at every position while the recurrence keeps the native states. The
  splice adds ``(R_t - S_t)^T q_t`` to the head's read at t (a read-only edit): ``hook_state`` itself is left as it
  is, the reads see ``R_t``, the next positions and the cache carry ``S_t``. This is what SAELens' evals and
  ``evaluate_state_sae`` measure.
- ``"state"``: the reconstruction becomes the state the recurrence continues from, a closed loop
  ``S'_t = SAE(transition_t(S'_{t-1}) + write_t)``. The model is stepped one position at a time with its recurrent
  cache, the state edit of ``hook_state`` replacing the head's state at each step (the edit propagates through the
  cache: the existing machinery, no new recurrence); then one replay over the whole sequence, in which the head's
  state is assigned the loop's reconstructions, gives the outputs and fires every hook once on whole tensors.

On any other hook a plain SAE replaces the activation (``[batch, pos, d_in]``), a head-indexed one the head's slice of
``[batch, pos, head, d_in]``. The splice hooks are attached for each forward call, after the user's hooks on the same
points (so those see the model's own activation and the SAE's hook points see the SAE's), except on ``hook_read``,
where the read-mode correction comes first (the user's hooks and the cache see the read the model uses).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ..hooking.root import HookedRecurrentLM
from ..sae_match import check_sae_shape
from .spliced_sae import SplicedSAE, silenced

STATE_MODES = ("read", "state")


class HookedSAEMixin:
    """Mixed in front of a ``HookedRecurrentLM`` family class (``class M(HookedSAEMixin, HookedQwen35)``), or added
    to an existing model with ``with_sae_splicing(model)``."""

    # ---- the attached splices ---------------------------------------------------------------------------------

    @property
    def _sae_splices(self) -> dict[str, SplicedSAE]:
        return self.__dict__.setdefault("_sae_splice_table", {})

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """Splice name (the hook name, plus ``.head{h}`` for head-indexed SAEs) -> SAE."""
        return {key: splice.sae for key, splice in self._sae_splices.items()}

    def add_sae(self, sae: Any, use_error_term: bool | None = None, mode: str | None = None) -> None:
        """Splice ``sae`` into the hook (and head) its metadata names, replacing an SAE already there.

        ``use_error_term`` (default: the SAE's own setting) adds ``input - reconstruction`` back, so the model's
        outputs are unchanged unless the SAE's features are intervened on. ``mode`` ("read", the default, or "state")
        is the meaning of an SAE on ``hook_state`` (module docstring); other hooks take no mode."""
        splice = self._new_splice(sae, use_error_term, mode)
        if splice.key in self._sae_splices:
            self._detach_splice(splice.key)
        self._attach_splice(splice)
        self.setup()

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Remove the SAEs at these splice names (or every head's SAE of a hook name); all of them by default."""
        if act_names is None:
            act_names = list(self._sae_splices)
        names = [act_names] if isinstance(act_names, str) else list(act_names)
        for name in names:
            keys = [key for key, splice in self._sae_splices.items() if name in (key, splice.hook_name)]
            if not keys:
                raise KeyError(f"no SAE is spliced at {name!r}; spliced: {sorted(self._sae_splices) or 'none'}")
            for key in keys:
                self._detach_splice(key)
        self.setup()

    @contextlib.contextmanager
    def saes(self, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None,
             mode: str | None = None) -> Iterator[Any]:
        """SAEs spliced inside the block; on exit (by default) the splices are as they were before it."""
        before = dict(self._sae_splices)
        try:
            for sae in _as_list(saes):
                self.add_sae(sae, use_error_term=use_error_term, mode=mode)
            yield self
        finally:
            if reset_saes_end:
                for key in list(self._sae_splices):
                    self._detach_splice(key)
                for splice in before.values():
                    self._attach_splice(splice)
                self.setup()

    def run_with_saes(self, *model_args: Any, saes: Any = (), reset_saes_end: bool = True,
                      use_error_term: bool | None = None, mode: str | None = None, **model_kwargs: Any) -> Any:
        """``forward`` with ``saes`` spliced for this call."""
        with self.saes(saes, reset_saes_end, use_error_term, mode):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args: Any, saes: Any = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, mode: str | None = None,
                                 **kwargs: Any) -> Any:
        """``run_with_cache`` with ``saes`` spliced; the cache holds the SAEs' hook points (docs/splicing.md)."""
        with self.saes(saes, reset_saes_end, use_error_term, mode):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(self, *model_args: Any, saes: Any = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, mode: str | None = None,
                                 fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), **kwargs: Any) -> Any:
        """``run_with_hooks`` with ``saes`` spliced."""
        with self.saes(saes, reset_saes_end, use_error_term, mode):
            return self.run_with_hooks(*model_args, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks), **kwargs)

    # ---- an SAE passed as a plain hook is refused ------------------------------------------------------------

    def add_hook(self, name: Any, hook: Any, *args: Any, **kwargs: Any) -> Any:
        _refuse_sae_as_hook(name, hook)
        return super().add_hook(name, hook, *args, **kwargs)

    def _enable_hook(self, name: Any, hook: Any, dir: Any) -> Any:  # run_with_hooks / hooks() attach through here
        _refuse_sae_as_hook(name, hook)
        return super()._enable_hook(name, hook, dir)

    # ---- forward ----------------------------------------------------------------------------------------------

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        splices = list(self._sae_splices.values())
        if not splices:
            return super().forward(input, *args, **kwargs)
        # by the root's signature (a family's forward may take *args, **kwargs and pass them on)
        arguments = _bound_arguments(HookedRecurrentLM.forward, self, input, *args, **kwargs)
        if arguments.get("final_positions") is not None:
            raise ValueError("final_positions cannot be combined with spliced SAEs (they act on every position); "
                             "run without it, or reset_saes() first")
        handles = [handle for splice in splices for handle in self._splice_hooks(splice)]
        try:
            closing = [splice for splice in splices if splice.mode == "state"]
            if closing:
                self._close_state_loops(closing, handles, arguments)
            return super().forward(input, *args, **kwargs)
        finally:
            for point, handle in handles:
                handle.hook.remove()
                point.fwd_hooks.remove(handle)
            for splice in splices:
                splice._buffers_for_call = {}

    def _close_state_loops(self, closing: list[SplicedSAE], handles: list, arguments: dict) -> None:
        """Step the model one position at a time with its cache, each state-mode SAE replacing its head's state at
        every step, and keep each SAE's inputs (the closed loop) for the replay. Other hooks (except those on the
        SAEs' own hook points) are off during the loop."""
        if arguments.get("start_at_layer") is not None:
            raise ValueError("state-mode SAEs need the tokens: start_at_layer cannot be combined with them")
        if arguments.get("attention_mask") is not None:
            raise NotImplementedError("state-mode SAEs with attention_mask (padded batches) are not supported; run "
                                      "the rows one at a time, or use mode='read'")
        tokens = self._as_tokens(arguments["input"], arguments.get("prepend_bos"))
        cache = arguments.get("cache")
        if tokens.shape[1] == 1:
            return  # one position: the splice acts on the state the cache continues from, as in generation
        loop_cache = cache.copy() if cache is not None else self.empty_cache()
        for splice in closing:
            splice._buffers_for_call["recording"] = []
        own_points = {id(point) for splice in self._sae_splices.values() for point in splice.hook_points().values()}
        others = [point for point in self.hook_dict.values() if id(point) not in own_points]
        keep = {handle.hook.id for _, handle in handles}
        with torch.no_grad(), silenced(others, keep):
            for t in range(tokens.shape[1]):
                super().forward(tokens[:, t : t + 1], return_type=None, cache=loop_cache)
        for splice in closing:
            recorded = splice._buffers_for_call.pop("recording")
            splice._buffers_for_call["recorded"] = torch.cat(recorded, dim=1)  # [batch, pos, d_in]

    # ---- building and placing splices -------------------------------------------------------------------------

    def _new_splice(self, sae: Any, use_error_term: bool | None, mode: str | None) -> SplicedSAE:
        metadata = getattr(sae.cfg, "metadata", None)
        hook_name = getattr(metadata, "hook_name", None)
        head = getattr(metadata, "hook_head_index", None)
        if not isinstance(hook_name, str):
            raise ValueError("the SAE's metadata names no hook (sae.cfg.metadata.hook_name); set it to where the SAE "
                             "belongs, e.g. 'blocks.1.mixer.hook_state' (with hook_head_index for one head)")
        self._check_hook_name(hook_name)
        if hook_name.rsplit(".", 1)[-1] == "hook_state":
            if head is None:
                raise ValueError(
                    f"{hook_name} holds every head's state [batch, pos, head, d_k * d_v]; an SAE without "
                    "metadata.hook_head_index would encode each head with one head's dictionary. Set "
                    "sae.cfg.metadata.hook_head_index to the head it was trained on")
            if not 0 <= int(head) < self.cfg.n_heads:
                raise ValueError(f"hook_head_index {head} is out of range for {hook_name}: heads "
                                 f"0..{self.cfg.n_heads - 1}")
            check_sae_shape(sae, self.cfg.d_k, self.cfg.d_v, where=f"{hook_name}")
            mode = "read" if mode is None else mode
            if mode not in STATE_MODES:
                raise ValueError(f"mode must be one of {STATE_MODES} for an SAE on {hook_name}, got {mode!r}")
        elif mode is not None:
            raise ValueError(f"mode={mode!r} is the meaning of an SAE on a recurrent state (hook_state); "
                             f"{hook_name} takes no mode")
        else:
            mode = "replace"
        if head is not None and any(s.hook_name == hook_name and s.head is None for s in self._sae_splices.values()):
            raise ValueError(f"{hook_name} already has an SAE of all heads spliced in; reset_saes({hook_name!r}) first")
        if head is None and any(s.hook_name == hook_name and s.head is not None for s in self._sae_splices.values()):
            raise ValueError(f"{hook_name} already has head-indexed SAEs spliced in; reset_saes({hook_name!r}) first")
        use_error_term = bool(getattr(sae, "use_error_term", False)) if use_error_term is None else use_error_term
        return SplicedSAE(sae, hook_name, None if head is None else int(head), mode, use_error_term)

    def _attach_splice(self, splice: SplicedSAE) -> None:
        point = self.hook_dict[splice.hook_name]
        if splice.head is None:
            for name, hook_point in splice.hook_points().items():
                point.add_module(name, hook_point)
        else:
            point.add_module(f"head{splice.head}", splice)
        self._sae_splices[splice.key] = splice

    def _detach_splice(self, key: str) -> None:
        splice = self._sae_splices.pop(key)
        point = self.hook_dict[splice.hook_name]
        names = splice.hook_points() if splice.head is None else [f"head{splice.head}"]
        for name in names:
            point._modules.pop(name, None)

    # ---- the hooks of one forward call ------------------------------------------------------------------------

    def _splice_hooks(self, splice: SplicedSAE) -> list:
        """Attach the splice's hooks for one forward call; returns (hook point, handle) pairs to remove."""
        if splice.mode == "read":
            mixer = splice.hook_name.rsplit(".", 1)[0]
            plan = [(f"{mixer}.hook_read_q", _capture_query(splice), False),
                    (splice.hook_name, _read_correction_from_state(splice), False),
                    (f"{mixer}.hook_read", _corrected_read(splice), True)]
        elif splice.mode == "state":
            plan = [(splice.hook_name, _state_replacement(splice), False)]
        else:
            plan = [(splice.hook_name, _activation_replacement(splice), False)]
        handles = []
        for name, hook, prepend in plan:
            point = self.hook_dict[name]
            point.add_hook(hook, dir="fwd", is_permanent=True, prepend=prepend)
            handles.append((point, point.fwd_hooks[0] if prepend else point.fwd_hooks[-1]))
        return handles


def with_sae_splicing(model: Any) -> Any:
    """The model itself, given the splicing methods (its class becomes a subclass with ``HookedSAEMixin``)."""
    if not isinstance(model, HookedSAEMixin):
        model.__class__ = _spliceable_class(type(model))
    return model


_SPLICEABLE: dict[type, type] = {}


def _spliceable_class(cls: type) -> type:
    if cls not in _SPLICEABLE:
        _SPLICEABLE[cls] = type(f"HookedSAE{cls.__name__.removeprefix('Hooked')}", (HookedSAEMixin, cls), {})
    return _SPLICEABLE[cls]


def _bound_arguments(forward: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """forward's arguments by name, the keyword-only extras (``**kwargs``) merged in."""
    signature = inspect.signature(forward)
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _refuse_sae_as_hook(name: Any, hook: Any) -> None:
    """``(hook_name, sae)`` as a plain hook would run the SAE on the whole activation: on ``hook_state`` that is every
    head's state encoded with one head's dictionary. Splicing places it by its metadata instead."""
    from sae_lens.saes.sae import SAE

    if not isinstance(hook, SAE):
        return
    where = name if isinstance(name, str) else "hook points chosen by a filter"
    if isinstance(name, str) and name.rsplit(".", 1)[-1] == "hook_state":
        why = (f"{name} holds every head's state [batch, pos, head, d_k * d_v], so the SAE would encode each head "
               "with one head's dictionary")
    else:
        why = "an SAE is not a hook function (its error term, cache names and modes come from splicing it)"
    raise ValueError(
        f"an SAE passed as a plain hook on {where}: {why}. Splice it instead: model.add_sae(sae) or "
        "model.run_with_saes(tokens, saes=[sae]), with sae.cfg.metadata.hook_name set to the hook (and "
        "hook_head_index to the head, for a state SAE); see docs/splicing.md")


def _as_list(saes: Any) -> list:
    if isinstance(saes, (list, tuple)):
        return list(saes)
    return [saes]


# ---- hook functions (one forward call; the splice keeps what they share in _buffers_for_call) ------------------


def _capture_query(splice: SplicedSAE):
    def hook(query: Tensor, hook) -> None:  # [batch, pos, head, d_k]
        splice._buffers_for_call["query"] = query[:, :, splice.head]

    return hook


def _read_correction_from_state(splice: SplicedSAE):
    def hook(states: Tensor, hook) -> None:  # [batch, pos, head, d_k * d_v]
        x = states[:, :, splice.head]
        sae_cfg = splice.sae.cfg
        difference = splice.reconstruct(x) - x  # [batch, pos, d_in]
        splice._buffers_for_call["difference"] = difference.unflatten(-1, (sae_cfg.d_k, sae_cfg.d_v))

    return hook


def _corrected_read(splice: SplicedSAE):
    def hook(reads: Tensor, hook) -> Tensor:  # [batch, pos, head, d_v]
        buffers = splice._buffers_for_call
        difference, query = buffers.pop("difference"), buffers.pop("query")
        correction = torch.einsum("bpkv,bpk->bpv", difference.to(reads.dtype), query.to(reads.dtype))
        out = reads.clone()
        out[:, :, splice.head] = reads[:, :, splice.head] + correction
        return out

    return hook


def _state_replacement(splice: SplicedSAE):
    def hook(states: Tensor, hook) -> Tensor:  # [batch, pos, head, d_k * d_v]
        buffers = splice._buffers_for_call
        x = states[:, :, splice.head]
        if "recording" in buffers:  # the closed loop, one position per call
            buffers["recording"].append(x.detach())
        elif "recorded" in buffers:  # the replay: the loop's inputs, not the native states shown here
            x = buffers["recorded"]
            if x.shape != states[:, :, splice.head].shape:
                raise RuntimeError(f"{hook.name}: the closed loop recorded {tuple(x.shape)}, the replay shows "
                                   f"{tuple(states[:, :, splice.head].shape)}")
        out = states.clone()
        out[:, :, splice.head] = splice.reconstruct(x)
        return out

    return hook


def _activation_replacement(splice: SplicedSAE):
    d_in = splice.sae.cfg.d_in

    def hook(activation: Tensor, hook) -> Tensor:
        if splice.head is None:
            if activation.dim() >= 4:
                raise ValueError(
                    f"{hook.name} has a head axis ({tuple(activation.shape)}); an SAE without "
                    "metadata.hook_head_index would encode every head with one dictionary. Set hook_head_index")
            _check_width(activation, d_in, hook.name)
            return splice.reconstruct(activation)
        if activation.dim() < 4 or not 0 <= splice.head < activation.shape[2]:
            raise ValueError(f"{hook.name} is {tuple(activation.shape)}: no head {splice.head} on axis 2 for a "
                             "head-indexed SAE")
        _check_width(activation, d_in, hook.name)
        out = activation.clone()
        out[:, :, splice.head] = splice.reconstruct(activation[:, :, splice.head])
        return out

    return hook


def _check_width(activation: Tensor, d_in: int, name: str) -> None:
    if activation.shape[-1] != d_in:
        raise ValueError(f"the SAE spliced at {name} takes d_in = {d_in}; the activation is {tuple(activation.shape)}")
