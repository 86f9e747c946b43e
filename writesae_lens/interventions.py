"""Intervention helpers: plain factories that return ``fwd_hooks`` lists for ``model.run_with_hooks`` / ``model.hooks``.

Every helper acts on the recurrent mixer of one layer (``blocks.{layer}.mixer``) at chosen cells ``(batch row,
position, head)`` and works with any model of the library (the write interface is shared). Two timings:

- ``"after_read"`` (default, the paper's protocol): the change is added to the state after the read at t, so the
  output at t is unchanged and position t + 1 is the first that sees it; it equals editing the cache between two
  decoding steps.
- ``"write"``: the change is part of the write at t, so the read at t already sees it.

The native write at a cell is ``beta_t k_t v_t^T`` (read from the write hooks during the same forward pass), so
"substitute", "delete" and "random control" are all: add ``new_write - native_write`` at the chosen timing.
The hooks keep no state between forward passes; inside one pass the native write factors are captured by hooks on
``hook_write_k`` / ``hook_write_v`` / ``hook_write_beta``, which run before the additions in the same layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from .hooking.hook_checks import checked_against_model
from .sae_match import check_sae_metadata, check_sae_shape

Timing = Literal["after_read", "write"]
Hooks = list[tuple[str, Callable]]
TIMING_HOOKS = {"after_read": "hook_post_read_add", "write": "hook_write_add"}


def mixer_hook(layer: int, name: str) -> str:
    return f"blocks.{layer}.mixer.{name}"


def as_cells(cells) -> Tensor:
    """``cells`` as a LongTensor [n, 3] of (batch row, position, head)."""
    cells = torch.as_tensor(cells, dtype=torch.long)
    if cells.dim() == 1:
        cells = cells[None]
    if cells.dim() != 2 or cells.shape[1] != 3:
        raise ValueError(f"cells must be (batch, pos, head) triples, shape [n, 3]; got shape {tuple(cells.shape)}")
    if (cells < 0).any():
        raise IndexError(f"cells must be non-negative (batch, pos, head) indices; got {cells.tolist()}")
    return cells


def _per_cell(values, n: int, trailing: tuple[int, ...], what: str) -> Tensor:
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.shape == trailing:
        values = values.expand(n, *trailing)
    if tuple(values.shape) != (n, *trailing):
        raise ValueError(f"{what} must have shape {trailing} or {(n, *trailing)}; got {tuple(values.shape)}")
    return values


def _check_cells(cells: Tensor, shape: tuple[int, ...], hook_name: str) -> None:
    batch, n_pos, n_heads = shape[:3]
    for column, (what, size) in enumerate((("batch row", batch), ("position", n_pos), ("head", n_heads))):
        if len(cells) and int(cells[:, column].max()) >= size:
            raise IndexError(f"{hook_name}: {what} {int(cells[:, column].max())} out of range; valid is 0..{size - 1}")


def add_to_state(layer: int, cells, matrices, timing: Timing = "after_read") -> Hooks:
    """Add one ``[d_k, d_v]`` matrix per cell to the state (at the write, or after the read)."""
    cells = as_cells(cells)
    matrices = torch.as_tensor(matrices, dtype=torch.float32)
    if matrices.dim() == 2:
        matrices = matrices.expand(len(cells), *matrices.shape)
    if matrices.dim() != 3 or matrices.shape[0] != len(cells):
        raise ValueError(f"matrices must be [n_cells, d_k, d_v] (or one [d_k, d_v]); got {tuple(matrices.shape)}")
    name = mixer_hook(layer, _timing_hook(timing))

    def add(edits: Tensor, hook) -> Tensor:
        _check_cells(cells, tuple(edits.shape), name)
        if tuple(matrices.shape[1:]) != tuple(edits.shape[3:]):
            raise ValueError(f"{name}: matrices are {tuple(matrices.shape[1:])}, the state is {tuple(edits.shape[3:])}")
        sparse = torch.sparse_coo_tensor(cells.T.to(edits.device), matrices.to(edits.device), edits.shape,
                                         check_invariants=False)
        return edits + sparse

    return [(name, add)]


def replace_write(layer: int, cells, build_new_write: Callable[[dict], Tensor], timing: Timing = "after_read") -> Hooks:
    """Replace the native write ``beta k v^T`` at each cell by ``build_new_write(native)``, where ``native`` holds the
    cells' native factors ``k`` [n, d_k], ``v`` [n, d_v], ``beta`` [n] and ``write`` [n, d_k, d_v]; it returns the new
    writes [n, d_k, d_v]. The building block of the helpers below."""
    cells = as_cells(cells)
    native: dict[str, Tensor] = {}

    def capture(name: str):
        def hook(x: Tensor, hook) -> None:
            _check_cells(cells, tuple(x.shape), hook.name)
            b, p, h = cells.T.to(x.device)
            native[name] = x[b, p, h].detach().float()

        return hook

    def add(edits: Tensor, hook) -> Tensor:
        _check_cells(cells, tuple(edits.shape), hook.name)
        k, v, beta = native["k"], native["v"], native["beta"]
        native["write"] = beta[:, None, None] * k[:, :, None] * v[:, None, :]
        new = build_new_write(native).to(edits.device, torch.float32)
        delta = new - native["write"]
        return edits + torch.sparse_coo_tensor(cells.T.to(edits.device), delta, edits.shape, check_invariants=False)

    return [
        (mixer_hook(layer, "hook_write_k"), capture("k")),
        (mixer_hook(layer, "hook_write_v"), capture("v")),
        (mixer_hook(layer, "hook_write_beta"), capture("beta")),
        (mixer_hook(layer, _timing_hook(timing)), add),
    ]


def delete_write(layer: int, cells, timing: Timing = "after_read") -> Hooks:
    """Remove the native write at each cell (``beta := 0``): the transition still acts on the previous state."""
    return replace_write(layer, cells, lambda native: torch.zeros_like(native["write"]), timing)


def substitute_write(layer: int, cells, matrices, amplitude: Literal["given", "native_norm"] = "given",
                     timing: Timing = "after_read") -> Hooks:
    """Write ``matrices[i]`` (e.g. ``c * atom``) instead of the native write at cell i. With
    ``amplitude="native_norm"`` each matrix is rescaled to the native write's Frobenius norm at its cell."""
    cells = as_cells(cells)
    matrices = torch.as_tensor(matrices, dtype=torch.float32)
    if matrices.dim() == 2:
        matrices = matrices.expand(len(cells), *matrices.shape)

    def build(native: dict) -> Tensor:
        if amplitude == "given":
            return matrices
        if amplitude == "native_norm":
            return matrices * (_frobenius(native["write"]) / _frobenius(matrices).clamp_min(1e-30))[:, None, None]
        raise ValueError(f"amplitude must be 'given' or 'native_norm', got {amplitude!r}")

    return replace_write(layer, cells, build, timing)


def substitute_atom(layer: int, cells, sae, atoms, coefficients=None,
                    amplitude: Literal["natural", "native_norm"] = "natural", timing: Timing = "after_read", *,
                    ignore_sae_metadata: bool = False) -> Hooks:
    """Write SAE atom ``atoms[i]`` in place of the native write at cell i: at its natural coefficient
    (``coefficients[i]``, the SAE's code there) or rescaled to the native write's Frobenius norm.

    The SAE must belong here: its metadata's hook and head are checked now, its state shape and model when the hooks
    are attached to a model; ``ignore_sae_metadata=True`` accepts another model, layer or head (``sae_match``)."""
    cells = as_cells(cells)
    check_sae_metadata(sae, layer=layer, heads=cells[:, 2].unique().tolist(), ignore=ignore_sae_metadata)
    matrices = atom_matrices(sae, atoms, len(cells))
    if amplitude == "natural":
        if coefficients is None:
            raise ValueError("amplitude='natural' needs the coefficients (the SAE code of each atom at its cell)")
        matrices = matrices * _per_cell(coefficients, len(cells), (), "coefficients")[:, None, None]
        hooks = substitute_write(layer, cells, matrices, "given", timing)
    elif amplitude == "native_norm":
        hooks = substitute_write(layer, cells, matrices, "native_norm", timing)
    else:
        raise ValueError(f"amplitude must be 'natural' or 'native_norm', got {amplitude!r}")
    return _checked_sae_hooks(hooks, sae, ignore_sae_metadata)


def gaussian_rank1(d_k: int, d_v: int, norms, generator: torch.Generator | None = None) -> Tensor:
    """Random rank-1 matrices ``u w^T`` (u, w standard normal) rescaled to the given Frobenius norms: [n, d_k, d_v]."""
    norms = torch.as_tensor(norms, dtype=torch.float32).reshape(-1)
    u = torch.randn(len(norms), d_k, generator=generator)
    w = torch.randn(len(norms), d_v, generator=generator)
    outer = u[:, :, None] * w[:, None, :]
    return outer * (norms / _frobenius(outer))[:, None, None]


def random_alive_atoms(active: Tensor, alive: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """For each row of ``active`` ([n, d_sae] bool: atoms active at that cell), one atom drawn uniformly from the
    alive ([d_sae] bool) atoms that are not active there. Error if a row has none."""
    candidates = alive[None, :] & ~active
    if not bool(candidates.any(-1).all()):
        raise ValueError("no alive, non-active atom to draw the random control from (too few alive atoms)")
    return torch.multinomial(candidates.float(), 1, generator=generator).squeeze(-1)


def add_direction(layer: int, cells, key, value, relative_magnitude: float = 1.0, timing: Timing = "write") -> Hooks:
    """Add ``m * ||native write||_F * key value^T / ||key value^T||_F`` on top of the native write at each cell."""
    cells = as_cells(cells)
    key = _per_cell(key, len(cells), (torch.as_tensor(key).shape[-1],), "key")
    value = _per_cell(value, len(cells), (torch.as_tensor(value).shape[-1],), "value")
    direction = key[:, :, None] * value[:, None, :]
    direction = direction / _frobenius(direction).clamp_min(1e-30)[:, None, None]

    def build(native: dict) -> Tensor:
        return native["write"] + relative_magnitude * _frobenius(native["write"])[:, None, None] * direction

    return replace_write(layer, cells, build, timing)


def amplify_features(layer: int, head: int, sae, offsets: dict[int, float], timing: Timing = "write", *,
                     ignore_sae_metadata: bool = False) -> Hooks:
    """Add ``sum_i offsets[i] * atom_i`` to the state of ``head`` at every position of every row (feature
    amplification; stays active while generating, one position per decoding step). The SAE is checked as in
    ``substitute_atom``; offsets must be finite."""
    if not offsets:
        raise ValueError("offsets is empty: give {feature: coefficient offset}")
    check_sae_metadata(sae, layer=layer, heads=[head], ignore=ignore_sae_metadata)
    features = torch.tensor(list(offsets), dtype=torch.long)
    weights = torch.tensor(list(offsets.values()), dtype=torch.float32)
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"offsets must be finite numbers; got {offsets}")
    matrix = (atom_matrices(sae, features, len(features)) * weights[:, None, None]).sum(0)  # [d_k, d_v]
    name = mixer_hook(layer, _timing_hook(timing))

    def add(edits: Tensor, hook) -> Tensor:
        batch, n_pos, n_heads = edits.shape[:3]
        if head >= n_heads:
            raise IndexError(f"{name}: head {head} out of range; valid is 0..{n_heads - 1}")
        check_sae_shape(sae, *edits.shape[3:], where=name)
        b, p = torch.meshgrid(torch.arange(batch), torch.arange(n_pos), indexing="ij")
        index = torch.stack([b.flatten(), p.flatten(), torch.full((batch * n_pos,), head)]).to(edits.device)
        values = matrix.to(edits.device).expand(batch * n_pos, *matrix.shape)
        return edits + torch.sparse_coo_tensor(index, values, edits.shape, check_invariants=False)

    return _checked_sae_hooks([(name, add)], sae, ignore_sae_metadata)


def erase_atom(layer: int, head: int, sae, atom: int, *, ignore_sae_metadata: bool = False) -> Hooks:
    """Remove atom ``atom``'s contribution ``a_i(t) A_i`` from the state of ``head`` wherever the SAE's code of
    ``S_t`` has it active; the recurrence continues from the edited states (a ``hook_state`` edit). The SAE is
    checked as in ``substitute_atom``."""
    check_sae_metadata(sae, layer=layer, heads=[head], ignore=ignore_sae_metadata)
    atom_matrices(sae, [atom], 1)  # a clear error now for an atom out of range
    name = mixer_hook(layer, "hook_state")

    def erase(states: Tensor, hook) -> Tensor:
        n_heads = states.shape[2]
        if head >= n_heads:
            raise IndexError(f"{name}: head {head} out of range; valid is 0..{n_heads - 1}")
        if getattr(sae.cfg, "d_in", None) != states.shape[3]:
            raise ValueError(f"{name}: the SAE encodes states of size d_in = {getattr(sae.cfg, 'd_in', None)}, this "
                             f"model's are d_k x d_v = {states.shape[3]}: it was trained on another model")
        codes = sae.encode(states[:, :, head].to(sae.dtype))  # [batch, pos, d_sae]
        coefficient = codes[..., atom].to(states.dtype)  # [batch, pos]
        flat_atom = atom_matrices(sae, [atom], 1)[0].flatten().to(states)
        out = states.clone()
        out[:, :, head] = states[:, :, head] - coefficient[..., None] * flat_atom
        return out

    return _checked_sae_hooks([(name, erase)], sae, ignore_sae_metadata)


def _checked_sae_hooks(hooks: Hooks, sae, ignore_sae_metadata: bool) -> Hooks:
    """Mark each hook so that attaching it to a model checks the SAE's state shape and model against that model."""

    def check(model) -> None:
        check_sae_shape(sae, model.cfg.d_k, model.cfg.d_v, where=f"model {model.cfg.model_name!r}")
        check_sae_metadata(sae, model_name=model.cfg.model_name, ignore=ignore_sae_metadata)

    return [(name, checked_against_model(hook, check)) for name, hook in hooks]


def atom_matrices(sae, atoms, n: int) -> Tensor:
    """The decoder atoms ``sum_r p_r q_r^T`` of a WriteSAE, [n, d_k, d_v] (fp32)."""
    atoms = torch.as_tensor(atoms, dtype=torch.long).reshape(-1)
    if len(atoms) == 1 and n > 1:
        atoms = atoms.expand(n)
    d_sae = sae.cfg.d_sae
    if len(atoms) != n or (len(atoms) and (int(atoms.min()) < 0 or int(atoms.max()) >= d_sae)):
        raise ValueError(f"atoms must be {n} indices in 0..{d_sae - 1}; got {atoms.tolist()}")
    keys = sae.W_dec_key.detach().float()[atoms.to(sae.W_dec_key.device)]  # [n, rank, d_k]
    values = sae.W_dec_value.detach().float()[atoms.to(sae.W_dec_value.device)]  # [n, rank, d_v]
    return torch.einsum("nrk,nrv->nkv", keys, values).cpu()


def combine(*hook_lists: Sequence[tuple[str, Callable]]) -> Hooks:
    """Concatenate several helpers' hook lists (they compose: additions at the same cells add up)."""
    return [pair for hooks in hook_lists for pair in hooks]


def _timing_hook(timing: str) -> str:
    if timing not in TIMING_HOOKS:
        raise ValueError(f"timing must be one of {sorted(TIMING_HOOKS)}, got {timing!r}")
    return TIMING_HOOKS[timing]


def _frobenius(matrices: Tensor) -> Tensor:
    return matrices.flatten(-2).norm(dim=-1)
