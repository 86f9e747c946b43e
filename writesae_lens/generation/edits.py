"""Cache edits of one head's state, as the generation engine applies them, and their formula.

A ``CacheEdit`` adds a rank-1 matrix to the state of ``(layer, head)`` of one batch row *after the read* at one
position of that row (the timing of an edit of the cache between two decoding steps: the output at that position is
unchanged, every later one sees the edit). Positions count in the row's own tokens: ``0 .. len(prompt) - 1`` are the
prompt, ``len(prompt) + j`` is the ``j``-th generated token.

The matrix, from the native write ``beta k v^T`` of that head at that position (read in the same forward pass: edits
of a layer's state never change its write factors at later positions, which come from the layers below):

    key   = edit.key    if given, else  k / |k|               (the unit write key)
    value = edit.value  if given, else  beta v / |beta v|      (the unit value side of the write)
    size  = edit.scale * (|beta k v^T|_F  if edit.relative else 1)
    Delta = size * key value^T

So the paper's three-position install is ``CacheEdit(value=v_T*, scale=m, relative=True)`` (key: the unit write key),
deleting the write is ``CacheEdit(value=None, scale=-1, relative=True)`` (``Delta = -beta k v^T``) and adding an atom
``c p q^T`` is ``CacheEdit(key=p, value=q, scale=c)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor


@dataclass(frozen=True)
class CacheEdit:
    """One rank-1 addition to a row's cached state (see the module docstring for the formula)."""

    row: int
    position: int
    layer: int
    head: int
    value: Tensor | None = None  # [d_v]; None: the unit value side of the native write
    key: Tensor | None = None  # [d_k]; None: the unit native write key
    scale: float = 1.0
    relative: bool = False  # scale times the native write's Frobenius norm


@dataclass(frozen=True)
class Push:
    """A matrix added to a row's state of ``(layer, head)`` after the read at every generated position (never the
    prompt): ``S <- S + matrix`` once per decoding step, so pushes accumulate through the recurrence (the paper's
    amplification probe; for a linear decoder it equals encode, add to the codes, decode, add back the residual)."""

    row: int
    layer: int
    head: int
    matrix: Tensor  # [d_k, d_v]


def edit_matrices(
    keys: Float[Tensor, "n d_k"],  # NaN rows: use the unit native key
    values: Float[Tensor, "n d_v"],  # NaN rows: use the unit native value side
    scales: Float[Tensor, " n"],
    relative: Bool[Tensor, " n"],
    native_k: Float[Tensor, "n d_k"],
    native_v: Float[Tensor, "n d_v"],
    native_beta: Float[Tensor, " n"],
) -> Float[Tensor, "n d_k d_v"]:
    """The matrices of n edits from their native write factors (vectorised ``reference_edit_matrix``)."""
    native_k, native_v, native_beta = native_k.float(), native_v.float(), native_beta.float()
    value_side = native_beta[:, None] * native_v  # [n, d_v]
    unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # noqa: E731
    key = torch.where(torch.isnan(keys).any(-1, keepdim=True), unit(native_k), keys.float())
    value = torch.where(torch.isnan(values).any(-1, keepdim=True), unit(value_side), values.float())
    write_norm = native_k.norm(dim=-1) * value_side.norm(dim=-1)  # |beta k v^T|_F of a rank-1 write
    size = scales.float() * torch.where(relative, write_norm, torch.ones_like(write_norm))
    return size[:, None, None] * key[:, :, None] * value[:, None, :]


def reference_edit_matrix(edit: CacheEdit, k: Tensor, v: Tensor, beta: float) -> Tensor:
    """The readable formula of one edit: ``edit_matrices`` equals it row by row (tests)."""
    write = beta * torch.outer(k.float(), v.float())  # [d_k, d_v]
    key = edit.key.float() if edit.key is not None else k.float() / k.float().norm()
    value = edit.value.float() if edit.value is not None else beta * v.float() / (beta * v.float()).norm()
    size = edit.scale * (float(torch.linalg.matrix_norm(write)) if edit.relative else 1.0)
    return size * torch.outer(key, value)


def stacked(edits: list[CacheEdit], d_k: int, d_v: int) -> dict[str, Tensor]:
    """The tensors ``edit_matrices`` takes for a list of edits: keys, values (NaN where native), scales, relative."""
    nan = float("nan")
    return {
        "keys": torch.stack([e.key.float() if e.key is not None else torch.full((d_k,), nan) for e in edits]),
        "values": torch.stack([e.value.float() if e.value is not None else torch.full((d_v,), nan) for e in edits]),
        "scales": torch.tensor([float(e.scale) for e in edits]),
        "relative": torch.tensor([bool(e.relative) for e in edits]),
    }


def check_edit(edit: CacheEdit, d_k: int, d_v: int) -> None:
    """Clear errors for an edit whose factors do not fit the state or are not finite."""
    if not math.isfinite(float(edit.scale)):
        raise ValueError(f"edit scale must be finite, got {edit.scale!r} (row {edit.row}, position {edit.position})")
    for name, vector, size in (("value", edit.value, d_v), ("key", edit.key, d_k)):
        if vector is None:
            continue
        if not isinstance(vector, Tensor) or tuple(vector.shape) != (size,):
            got = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
            raise ValueError(f"edit {name} must be a [{size}] tensor (the state is d_k x d_v = {d_k} x {d_v}); "
                             f"got {got}")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError(f"edit {name} holds non-finite values (row {edit.row}, position {edit.position})")
