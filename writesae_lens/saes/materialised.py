"""Guard the materialised `W_dec` / `W_enc` of a WriteSAE against writes that cannot take effect.

A WriteSAE stores its decoder (and a bilinear encoder) as factors; `sae.W_dec` and `sae.W_enc`
build the dense matrices from them on each access. A write into such a tensor
(`sae.W_dec.data[:5] = 0`, `sae.W_dec.data = M`, an in-place op under no_grad) changes only that
copy. SAELens' recipes that edit `W_dec` would therefore be silently discarded; instead this
module remembers every tensor it handed out with a snapshot of its values, and the SAE's next
use (encode, decode, another W_dec / W_enc access, state_dict, save) compares them and raises
`MaterialisedWriteError` naming the factors to edit.

Tensors handed out are remembered per SAE in a weak-keyed table (nothing is added to the module,
so pickling, deepcopy and state_dict are unchanged): the latest one per name strongly, so that a
write through a temporary (`sae.W_dec.data[...] = x`) is still seen, the older ones weakly, while
the caller keeps them.
"""

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class MaterialisedWriteError(RuntimeError):
    """A write into a materialised W_dec / W_enc, which cannot reach the factors it came from."""


FACTORS = {
    "W_dec": "W_dec_key [d_sae, rank, d_k] and W_dec_value [d_sae, rank, d_v]",
    "W_enc": "W_enc_key [d_sae, rank, d_k] and W_enc_value [d_sae, rank, d_v]",
}


@dataclass
class _HandedOut:
    name: str
    snapshot: Tensor
    strong: Tensor | None = None
    weak: Any = None

    def tensor(self) -> Tensor | None:
        return self.strong if self.strong is not None else self.weak()


@dataclass
class _Ledger:
    entries: list[_HandedOut] = field(default_factory=list)


_LEDGERS: "weakref.WeakKeyDictionary[Any, _Ledger]" = weakref.WeakKeyDictionary()


def hand_out(sae: Any, name: str, tensor: Tensor) -> Tensor:
    """Remember `tensor` (sae.<name>, just materialised) with a snapshot of its values; return it."""
    ledger = _LEDGERS.setdefault(sae, _Ledger())
    kept: list[_HandedOut] = []
    for entry in ledger.entries:
        if entry.name == name and entry.strong is not None:  # demote the previous latest one
            entry.weak, entry.strong = weakref.ref(entry.strong), None
        if entry.tensor() is not None:
            kept.append(entry)
    kept.append(_HandedOut(name, tensor.detach().clone(), strong=tensor))
    ledger.entries = kept
    return tensor


def _unchanged(tensor: Tensor, snapshot: Tensor) -> bool:
    current = tensor.detach()
    if current.shape != snapshot.shape or current.dtype != snapshot.dtype:
        return False
    if current.device != snapshot.device:
        current = current.to(snapshot.device)
    return torch.equal(current, snapshot) or bool(
        ((current == snapshot) | (current.isnan() & snapshot.isnan())).all()
    )


def check_unmodified(sae: Any) -> None:
    """Raise MaterialisedWriteError if any W_dec / W_enc handed out by `sae` was written to.

    The table is cleared first, so after the error the SAE is usable again (with its factors
    as they were).
    """
    ledger = _LEDGERS.get(sae)
    if ledger is None or not ledger.entries:
        return
    modified = []
    alive = []
    for entry in ledger.entries:
        tensor = entry.tensor()
        if tensor is None:
            continue
        alive.append(entry)
        if not _unchanged(tensor, entry.snapshot):
            modified.append(entry.name)
    if modified:
        ledger.entries = []
        raise MaterialisedWriteError(write_message(sorted(set(modified))))
    ledger.entries = alive


def write_message(names: list[str]) -> str:
    which = " and ".join(f"sae.{n}" for n in names)
    factors = "; ".join(f"{n} is built from {FACTORS[n]}" for n in names)
    return (
        f"{which} was written to, but a WriteSAE rebuilds it from its factors on every access "
        f"({factors}), so the write did not change the SAE. Edit the factors instead, e.g. "
        "sae.W_dec_key.data[i] = 0 removes atom i, and sae.set_atoms_(indices, atoms) writes "
        "decoder atoms given as flattened [d_k, d_v] matrices of rank <= cfg.rank."
    )


def assignment_message(name: str, dense_name: str | None = None) -> str:
    if dense_name is not None:
        return (
            f"sae.{name} cannot be assigned; it is a view of the parameter sae.{dense_name}. Assign "
            f"or edit sae.{dense_name} (shape [d_in, d_sae])."
        )
    return (
        f"sae.{name} cannot be assigned: a WriteSAE computes it from {FACTORS[name]}. Edit those "
        "factors" + (", or use sae.set_atoms_(indices, atoms)." if name == "W_dec" else ".")
    )
