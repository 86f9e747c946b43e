"""Checks run when a user's hook is attached to a hooked model and when it returns.

- What a forward hook returns must keep the activation's shape, dtype and device: a wrong but broadcastable shape (a
  ``[d_model]`` vector for ``[batch, pos, d_model]``) or another dtype would otherwise flow on silently. The
  mixer's write-interface points (``write_mixer.WRITE_HOOK_NAMES``, the sparse edit points among them) are left to
  the mixer, which checks their shapes and finiteness and casts them to fp32.
- A hook function may carry ``check_model(model)`` (set with ``checked_against_model``): the model calls it when the
  hook is attached, so a helper that builds hooks from an SAE (``interventions.substitute_atom``, ...) can check that
  SAE against the model it is used with, without the model among its arguments.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .write_mixer import WRITE_HOOK_NAMES


def checked_against_model(hook: Callable, check: Callable) -> Callable:
    """Mark ``hook`` so that attaching it to a model calls ``check(model)`` first; returns ``hook``."""
    hook.check_model = check
    return hook


def check_on_attach(model, hook: Callable) -> None:
    """Run the hook's ``check_model`` (if it has one) against ``model``."""
    check = getattr(hook, "check_model", None)
    if check is not None:
        check(model)


def keeping_activation_form(hook: Callable) -> Callable:
    """``hook`` wrapped: a returned tensor of another shape, dtype or device is an error naming the hook point."""

    def checked(activation, hook_point):
        out = hook(activation, hook=hook_point)
        if out is None or out is activation or not isinstance(activation, Tensor) or activation.is_sparse:
            return out
        name = getattr(hook_point, "name", None) or "?"
        if name.rsplit(".", 1)[-1] in WRITE_HOOK_NAMES:  # checked by the mixer
            return out
        if not isinstance(out, Tensor):
            raise TypeError(f"a hook on {name} returned {type(out).__name__}; it must return None or a tensor "
                            f"{tuple(activation.shape)} {activation.dtype}")
        problems = []
        if out.shape != activation.shape:
            problems.append(f"shape {tuple(out.shape)} instead of {tuple(activation.shape)}")
        if out.dtype != activation.dtype:
            problems.append(f"dtype {out.dtype} instead of {activation.dtype}")
        if out.device != activation.device:
            problems.append(f"device {out.device} instead of {activation.device}")
        if problems:
            raise ValueError(f"a hook on {name} returned a tensor of {', '.join(problems)}; it must keep the shape, "
                             "dtype and device of the activation (or return None)")
        return out

    def call(activation, hook=None):
        return checked(activation, hook)

    call.__name__ = getattr(hook, "__name__", "hook")
    call.__wrapped__ = hook
    return call
