"""The precision in which an analysis compares conditions: the layers from the edited one on, in float32.

A single write changes the next-token distribution by KLs of 1e-6 to 1e-2; a bfloat16 model rounds its residual
stream and logits at about 4e-3 of their size, so a bfloat16 run from the edited layer on measures its own rounding
more than the edit (issue #18). The analyses therefore run the part of the model an edit goes through (the edited
layer, every later layer, the final norm and the unembedding) in the compute precision of ``ops.precision``
(float32 for a bfloat16 or float16 model; a float32 or float64 model is used as it is, so nothing changes there).
The layers before the edited one stay in the model's dtype: what they compute is the context the edit lands in, the
same for every condition.

``comparison_model(model, layer, precision)`` returns the model to run from ``layer`` on: ``model`` itself, or a copy
in which those modules are converted. The copy shares the earlier blocks and the embedding with ``model`` (no memory
for them) unless a converted module shares a parameter with them (tied embeddings): then those are copied as well,
so ``model`` is never changed.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from ..ops.precision import compute_dtype

PRECISIONS = ("float32", "model")


def check_precision(precision: str) -> None:
    """A clear error for an unknown comparison precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} ('float32': the layers from the edited one on in "
                         f"float32 whatever the model's dtype; 'model': in the model's dtype), got {precision!r}")


def tail_dtype(model, precision: str) -> torch.dtype:
    """The dtype the layers from the edited one on run in: the model's own, or its compute precision."""
    check_precision(precision)
    weight = next(model.parameters())
    return weight.dtype if precision == "model" else compute_dtype(weight)


def comparison_model(model, layer: int, precision: str = "float32"):
    """``model``, or a copy whose blocks from ``layer`` on, final norm and unembedding are in ``tail_dtype`` (the
    earlier blocks and the embedding shared with ``model`` where no converted parameter is theirs too)."""
    dtype = tail_dtype(model, precision)
    tail = [*model.blocks[layer:], model.ln_final, model.unembed]
    if all(t.dtype == dtype for module in tail for t in (*module.parameters(), *module.buffers())
           if t.is_floating_point()):
        return model
    converted = {id(t) for module in tail for t in (*module.parameters(), *module.buffers())}
    memo = {}
    for module in [*model.blocks[:layer], model.embed]:
        if not any(id(t) in converted for t in (*module.parameters(), *module.buffers())):
            memo[id(module)] = module  # shared, not copied
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        memo[id(tokenizer)] = tokenizer
    copied = copy.deepcopy(model, memo)
    for module in [*copied.blocks[layer:], copied.ln_final, copied.unembed]:
        module.to(dtype)
    copied.cfg.dtype = dtype  # what the copy computes in from the layer on (only that part of it ever runs)
    return copied


def as_tail_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stream entering the tail (the residual stream, a carried stream) in its dtype; integer tensors as they are."""
    return x.to(dtype) if x.is_floating_point() else x


def full_run_start(model, layer: int) -> int:
    """The first float32 layer of a run that starts from the tokens (generation, a prefix run): ``layer``, or 0 for a
    family with carried streams (RWKV-7's v-first: layer 0 computes it and every later layer reads it inside the
    same call, so a float32 layer after a lower-precision layer 0 would read a lower-precision stream it cannot
    mix with its own; a run from ``start_at_layer`` takes that stream as an input and needs no such rule)."""
    return 0 if model.carried_streams and layer > 0 else layer


@contextmanager
def full_run(model, runner, start: int):
    """Within the block, ``runner`` (``comparison_model(model, start, ...)``) runs from the tokens: the residual
    stream entering block ``start`` is cast to the dtype of the layers from there on, and the embedding's output to
    the dtype of the first block (a tied embedding is converted with the unembedding in the copy; cast back to the
    model's dtype it gives the model's own values exactly). The casts are PyTorch hooks on modules of the copy only
    (the hook points check that a hook keeps an activation's dtype); nothing is registered when ``runner`` is
    ``model``."""
    handles = []
    if runner is not model:
        front = next(runner.blocks[0].parameters()).dtype
        tail = next(runner.blocks[start].parameters()).dtype
        if runner.embed is not model.embed:  # tied: the copy's embedding was converted
            handles.append(runner.embed.register_forward_hook(lambda module, args, out: out.to(front)))
        handles.append(runner.blocks[start].register_forward_pre_hook(
            lambda module, args: (as_tail_input(args[0], tail), *args[1:])))
    try:
        yield runner
    finally:
        for handle in handles:
            handle.remove()
