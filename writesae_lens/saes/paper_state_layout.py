"""Which state layout a paper checkpoint was trained on, decided from what the checkpoint (or a model) says.

The authors read the state from transformers' caches. For Gated DeltaNet / DeltaNet / GLA that cache is key-first,
``[d_k, d_v]``, like this library's ``hook_state`` ("key_first"). For Mamba-2 it is ``[head_dim, d_state]``, the
transpose of ``hook_state`` (``[d_state, head_dim]``): "head_dim_first". The checkpoint's ``d_in`` is the same either
way, so a wrong layout runs without an error and gives wrong codes. ``decide_state_layout`` therefore decides only
from evidence, in this order, and refuses when there is none:

1. ``model``: the hooked model the SAE is meant for. ``HookedMamba2`` -> "head_dim_first"; every other family
   -> "key_first". (A family named in the checkpoint's config that contradicts the model is an error.)
2. a model family named in the checkpoint's config (``model``, ``model_name``, ``architecture``, ... containing
   "mamba" -> "head_dim_first"; "qwen", "deltanet", "gdn", "gla" -> "key_first"). The authors' training code does
   not record one, but a config edited by hand or written by other code may.
3. the authors' own runs, recognised by the checkpoint's state shape and training recipe (``PAPER_RUNS``): their
   Mamba-2 runs are the only ones with ``(d_k, d_v) = (64, 128)`` (``head_dim`` 64, ``d_state`` 128) and were trained
   with batch 128 for 50 epochs; their Gated DeltaNet and DeltaNet runs are ``128 x 128`` with batch 256 for 20 epochs;
   GLA-1.3B ``256 x 512``, batch 256, 20 epochs. A recipe key the config lacks is not held against a match; one it
   records with another value is.

Pure functions: nothing here touches tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEY_FIRST, HEAD_DIM_FIRST = "key_first", "head_dim_first"
STATE_LAYOUTS = (KEY_FIRST, HEAD_DIM_FIRST)
AUTO = "auto"

# config keys that may name the model the checkpoint was trained on
FAMILY_KEYS = ("model", "model_name", "model_id", "base_model", "hf_model", "architecture", "model_type", "family")
# words in those values, and the layout of that family's transformers / fla cache
FAMILY_WORDS = (("mamba", HEAD_DIM_FIRST), ("qwen", KEY_FIRST), ("deltanet", KEY_FIRST), ("gdn", KEY_FIRST),
                ("gla", KEY_FIRST))


@dataclass(frozen=True)
class PaperRun:
    """The state shape (in the checkpoint's own names) and recipe of one family of the authors' training runs."""

    description: str
    d_k: int
    d_v: int
    batch_size: int
    epochs: int
    layout: str

    def matches(self, config: Mapping[str, Any], d_k: int, d_v: int) -> bool:
        if (d_k, d_v) != (self.d_k, self.d_v):
            return False
        recipe = {"batch_size": self.batch_size, "epochs": self.epochs}
        return all(config.get(key) in (None, value) for key, value in recipe.items())


PAPER_RUNS = (
    PaperRun("the authors' Mamba-2 runs (transformers' cache [head_dim = 64, d_state = 128]; batch 128, 50 epochs)",
             64, 128, 128, 50, HEAD_DIM_FIRST),
    PaperRun("the authors' Gated DeltaNet / DeltaNet runs (key-first cache [128, 128]; batch 256, 20 epochs)",
             128, 128, 256, 20, KEY_FIRST),
    PaperRun("the authors' GLA runs (key-first cache [256, 512]; batch 256, 20 epochs)", 256, 512, 256, 20, KEY_FIRST),
)


class StateLayoutError(ValueError):
    """The layout cannot be decided, or the evidence contradicts itself."""


@dataclass(frozen=True)
class LayoutDecision:
    layout: str
    reason: str


def how_to_choose() -> str:
    return (f"Pass state_layout={HEAD_DIM_FIRST!r} for a checkpoint trained on transformers' Mamba-2 cache "
            f"([head_dim, d_state], the transpose of hook_state), or state_layout={KEY_FIRST!r} for one trained on "
            "key-first [d_k, d_v] states (Gated DeltaNet, DeltaNet and GLA caches, or this library's hook_state); "
            "or pass model=<the hooked model> to decide from its family.")


def decide_state_layout(state_layout: str, config: Mapping[str, Any], d_k: int, d_v: int,
                        model: Any = None) -> LayoutDecision:
    """The layout to import with. ``d_k``, ``d_v``: the checkpoint's state shape in its own names (before any
    transposition); ``config``: the checkpoint's config; ``model``: a hooked model or None."""
    if state_layout in STATE_LAYOUTS:
        return LayoutDecision(state_layout, "given (state_layout)")
    if state_layout != AUTO:
        raise StateLayoutError(f"state_layout must be one of {(AUTO, *STATE_LAYOUTS)}, got {state_layout!r}.")
    named = family_in_config(config)
    if model is not None:
        from_model = layout_of_model(model)
        if named is not None and named.layout != from_model.layout:
            raise StateLayoutError(
                f"The checkpoint's config says {named.reason}, which means state_layout={named.layout!r}, but the "
                f"model is {from_model.reason}, which means {from_model.layout!r}. The SAE was trained on another "
                "model; " + how_to_choose())
        return from_model
    if named is not None:
        return named
    for run in PAPER_RUNS:
        if run.matches(config, d_k, d_v):
            return LayoutDecision(run.layout, f"state shape and recipe of {run.description}")
    raise StateLayoutError(
        f"Cannot tell which layout this checkpoint's [{d_k}, {d_v}] states were in: its config names no model "
        f"family, no model was given, and its shape and recipe (batch_size={config.get('batch_size')}, "
        f"epochs={config.get('epochs')}) are not those of the authors' runs. Both layouts have d_in = {d_k * d_v}, "
        "so a wrong guess would run and give wrong codes. " + how_to_choose())


def family_in_config(config: Mapping[str, Any]) -> LayoutDecision | None:
    """The layout of a model family the config names (None: it names none; an error: it names two)."""
    found = {}
    for key in FAMILY_KEYS:
        value = config.get(key)
        if not isinstance(value, str):
            continue
        for word, layout in FAMILY_WORDS:
            if word in value.lower():
                found[layout] = f"{key}={value!r}"
    if len(found) > 1:
        raise StateLayoutError(f"The checkpoint's config names families of both layouts ({found}). " + how_to_choose())
    if not found:
        return None
    (layout, said), = found.items()
    return LayoutDecision(layout, f"the config's {said}")


def layout_of_model(model: Any) -> LayoutDecision:
    """HookedMamba2 -> head_dim_first (the authors read transformers' [head_dim, d_state] cache); other families ->
    key_first."""
    from writesae_lens.adapters import HookedMamba2
    from writesae_lens.hooking.root import HookedRecurrentLM

    if not isinstance(model, HookedRecurrentLM):
        raise StateLayoutError(f"model must be a hooked model of this library (HookedQwen35, HookedMamba2, "
                               f"HookedRWKV7, ...), got {type(model).__name__}.")
    if isinstance(model, HookedMamba2):
        return LayoutDecision(HEAD_DIM_FIRST, f"a {type(model).__name__} (transformers' Mamba-2 cache is "
                                              "[head_dim, d_state])")
    return LayoutDecision(KEY_FIRST, f"a {type(model).__name__} (its family's cache is key-first)")
