"""Baselines and controls of the substitution test (paper-method §8.1-8.2).

**Flat SAE + top-1 SVD.** A flat SAE (SAELens' own ``"topk"`` architecture, trained by its runner on the same hook
and head: ``pipeline.train_flat_sae``) has no write-shaped atoms. It enters the substitution test through
``SVDAtoms``: each flat decoder row, reshaped to ``d_k x d_v``, is replaced by its leading singular triple
``s1 u1 v1^T`` (as a rank-1 atom with factors ``sqrt(s1) u1`` and ``sqrt(s1) v1``), and the test runs with
``amplitude="native_norm"`` (matched Frobenius norm). Two variants (§8.1, §11.35):

- ``"reconstruction"`` (App. F.4, primary): the substituted matrix is the top-1 SVD of the flat SAE's full
  reconstruction ``decode(encode(S_t))`` at the firing, rescaled to ``||Delta_nat||_F`` (``reconstruction_top1``,
  passed to ``replacement_test`` as ``substitute``);
- ``"atom"`` (Table 6 footnote): the top-1 SVD of the dominant flat atom, rescaled likewise.

The random control is a random alive, non-active flat atom's top-1 SVD at the same norm.

**Rank-2 control.** A WriteSAE with ``rank=2`` (``TrainSettings(rank=2)``) goes through ``replacement_test`` as it is.

``compare_substitution`` runs any set of these on the same passages and returns one row each (paper Tables 6 / 14).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from .records import validate_records
from .stats import proportion, strict_chain_indicator, win_indicator
from .numerical_floor import floor_summary
from .substitution import replacement_test

FLAT_VARIANTS = ("reconstruction", "atom")


def top1_svd(matrices: Float[Tensor, "n d_k d_v"]) -> tuple[Tensor, Tensor, Tensor]:
    """The leading singular triple of each matrix: ``(s1 [n], u1 [n, d_k], v1 [n, d_v])``, ``M ~ s1 u1 v1^T``."""
    u, s, vh = torch.linalg.svd(matrices.double(), full_matrices=False)
    return s[:, 0].float(), u[:, :, 0].float(), vh[:, 0, :].float()


def rank1_part(matrices: Float[Tensor, "n d_k d_v"]) -> Float[Tensor, "n d_k d_v"]:
    """``s1 u1 v1^T``: the best rank-1 approximation of each matrix (Eckart-Young)."""
    s, u, v = top1_svd(matrices)
    return s[:, None, None] * u[:, :, None] * v[:, None, :]


class SVDAtoms:
    """A flat SAE seen as a WriteSAE with rank-1 atoms: encoding is the flat SAE's own; atom i is the top-1 SVD of its
    decoder row i reshaped to ``d_k x d_v`` (``W_dec_key`` [d_sae, 1, d_k], ``W_dec_value`` [d_sae, 1, d_v]). What
    ``replacement_test`` and ``interventions.atom_matrices`` read; not an SAE to train or save."""

    def __init__(self, flat_sae, d_k: int, d_v: int) -> None:
        d_in = flat_sae.cfg.d_in
        if d_in != d_k * d_v:
            raise ValueError(f"the flat SAE has d_in = {d_in}, but the state is d_k x d_v = {d_k} x {d_v} = "
                             f"{d_k * d_v}")
        self.flat = flat_sae
        self.cfg = SimpleNamespace(d_sae=flat_sae.cfg.d_sae, d_in=d_in, d_k=d_k, d_v=d_v,
                                   metadata=getattr(flat_sae.cfg, "metadata", None))
        atoms = flat_sae.W_dec.detach().float().cpu().reshape(-1, d_k, d_v)  # [d_sae, d_k, d_v]
        s, u, v = top1_svd(atoms)
        root = s.sqrt()[:, None]
        self.W_dec_key = (root * u)[:, None, :]  # [d_sae, 1, d_k]
        self.W_dec_value = (root * v)[:, None, :]  # [d_sae, 1, d_v]

    @property
    def device(self):
        return self.flat.device

    @property
    def dtype(self):
        return self.flat.dtype

    def encode(self, states: Tensor) -> Tensor:
        return self.flat.encode(states)

    def reconstruct(self, states: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_in"]:
        return self.flat.decode(self.flat.encode(states))


def reconstruction_top1(flat_sae, d_k: int, d_v: int):
    """The ``substitute`` of the ``"reconstruction"`` variant: at each firing, the top-1 SVD of the flat SAE's full
    reconstruction (decoded from its code there, decoder bias included) rescaled to the native write's norm."""
    d_sae = flat_sae.cfg.d_sae

    def substitute(passage: int, positions: list[int], active: list, native_norms: Tensor) -> Tensor:
        code = torch.zeros(len(positions), d_sae)
        for i, (features, codes) in enumerate(active):
            code[i, torch.as_tensor(features, dtype=torch.long)] = torch.as_tensor(codes, dtype=torch.float32)
        with torch.no_grad():
            recon = flat_sae.decode(code.to(flat_sae.device, flat_sae.dtype)).float().cpu().reshape(-1, d_k, d_v)
        top = rank1_part(recon)
        return top * (native_norms / top.flatten(1).norm(dim=-1).clamp_min(1e-30))[:, None, None]

    return substitute


def flat_svd_test(model, flat_sae, layer: int, head: int, tokens, *, variant: str = "reconstruction", **options):
    """``replacement_test`` of the flat SAE through its top-1 SVDs at matched Frobenius norm (see the module doc);
    ``options`` go to ``replacement_test`` (``amplitude`` is fixed to ``"native_norm"``)."""
    if variant not in FLAT_VARIANTS:
        raise ValueError(f"variant must be one of {FLAT_VARIANTS}, got {variant!r}")
    if "amplitude" in options:
        raise ValueError("the flat+SVD baseline always substitutes at the native write's norm: drop amplitude")
    svd = SVDAtoms(flat_sae, model.cfg.d_k, model.cfg.d_v)
    substitute = reconstruction_top1(flat_sae, model.cfg.d_k, model.cfg.d_v) if variant == "reconstruction" else None
    return replacement_test(model, svd, layer, head, tokens, amplitude="native_norm", substitute=substitute, **options)


def substitution_row(name: str, records: pd.DataFrame) -> dict:
    """One row of the comparison table: firings, passages, win rate with its Wilson interval, strict chain, median
    KLs, and the run's numerical floor with the firings at or below it (``numerical_floor``; NaN / -1 for records
    saved before #18, which have no ``kl_floor``)."""
    table = validate_records(records)
    kl = {c: table[f"kl_{c}"].to_numpy() for c in ("atom", "delete", "random")}
    win = proportion(win_indicator(kl["atom"], kl["delete"]))
    chain = proportion(strict_chain_indicator(kl["atom"], kl["delete"], kl["random"]))
    return {
        "substitute": name, "firings": win.n, "passages": int(table["passage"].nunique()),
        "win_rate": win.rate, "wilson_low": win.low, "wilson_high": win.high, "strict_chain": chain.rate,
        **{f"median_kl_{c}": float(np.median(values)) for c, values in kl.items()},
        **_floor_columns(records),
    }


def _floor_columns(records: pd.DataFrame) -> dict:
    floor = floor_summary(records)
    if floor is None:
        return {"floor": float("nan"), "below_floor": -1}
    return {"floor": floor.floor, "below_floor": floor.n_below}


def compare_substitution(records_by_name: dict[str, pd.DataFrame], reference: str | None = None) -> pd.DataFrame:
    """One row per substitute (``substitution_row``), with ``reference_minus_pp``: the win rate of ``reference``
    (default: the first) minus this one's, in percentage points (the paper's Delta)."""
    if not records_by_name:
        raise ValueError("no record tables to compare")
    rows = [substitution_row(name, records) for name, records in records_by_name.items()]
    table = pd.DataFrame(rows)
    reference = reference or rows[0]["substitute"]
    if reference not in records_by_name:
        raise ValueError(f"reference {reference!r} is not one of {list(records_by_name)}")
    base = float(table.loc[table["substitute"] == reference, "win_rate"].iloc[0])
    table["reference_minus_pp"] = 100 * (base - table["win_rate"])  # the paper's Delta (WriteSAE - flat+SVD)
    return table
