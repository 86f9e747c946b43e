"""Whether an SAE belongs where it is used: its state shape, and the model, hook and head its metadata records.

An SAE trained by SAELens' runner records ``metadata.model_name``, ``metadata.hook_name`` and
``metadata.hook_head_index``; a WriteSAE also has ``cfg.d_k`` / ``cfg.d_v`` (a flat SAE only ``d_in = d_k * d_v``).
Fields the SAE does not record are not checked. The state shape must always match (nothing else can run); a
different model, hook or head is refused unless the caller passes ``ignore_sae_metadata=True`` (the command line's
``--ignore-sae-metadata``), for users who know the SAE transfers.
"""

from __future__ import annotations

OVERRIDE_HINT = ("pass ignore_sae_metadata=True (command line: --ignore-sae-metadata) to use it here anyway")


def state_hook(layer: int) -> str:
    return f"blocks.{layer}.mixer.hook_state"


def check_sae_shape(sae, d_k: int, d_v: int, where: str = "the model") -> None:
    """The SAE encodes ``[d_k, d_v]`` states (a WriteSAE's ``d_k``, ``d_v``; a flat SAE's ``d_in = d_k * d_v``)."""
    cfg = sae.cfg
    sae_k, sae_v = getattr(cfg, "d_k", None), getattr(cfg, "d_v", None)
    if sae_k is None and sae_v is None:
        d_in = getattr(cfg, "d_in", None)
        if d_in != d_k * d_v:
            raise ValueError(f"the SAE's input size d_in = {d_in} does not match the state of {where}: "
                             f"d_k x d_v = {d_k} x {d_v} = {d_k * d_v}")
        return
    if (sae_k, sae_v) != (d_k, d_v):
        raise ValueError(f"the SAE's state shape (d_k, d_v) = ({sae_k}, {sae_v}) does not match {where}'s "
                         f"({d_k}, {d_v}): it was trained on another model")


def check_sae_metadata(sae, *, model_name=None, layer: int | None = None, heads=(), ignore: bool = False) -> None:
    """The model, hook and head the SAE records, against those given (None / empty: not checked)."""
    if ignore:
        return
    metadata = getattr(sae.cfg, "metadata", None)
    if metadata is None:
        return
    recorded_model = getattr(metadata, "model_name", None)
    if model_name is not None and recorded_model is not None:
        from .hooking.loading import canonical_model_name

        if canonical_model_name(recorded_model) != canonical_model_name(model_name):
            raise ValueError(f"the SAE was trained on model {recorded_model!r}, not on {str(model_name)!r}; "
                             + OVERRIDE_HINT)
    hook_name = getattr(metadata, "hook_name", None)
    if layer is not None and hook_name is not None and hook_name != state_hook(layer):
        raise ValueError(f"the SAE was trained on {hook_name!r}, not on {state_hook(layer)!r}; " + OVERRIDE_HINT)
    head_index = getattr(metadata, "hook_head_index", None)
    for head in heads:
        if head_index is not None and int(head_index) != int(head):
            raise ValueError(f"the SAE was trained on head {head_index}, not on head {int(head)}; " + OVERRIDE_HINT)
