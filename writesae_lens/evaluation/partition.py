"""The register / bundle partition of a WriteSAE's atoms (paper-method §5.1).

For every firing (passage, position t, atom i with a non-zero code) the **signed cosine** between the atom
``A_i = sum_r p_r q_r^T`` and the native write at t, ``k_t u_t^T``, in the Frobenius inner product:

    cos_F(A_i, k u^T) = <A_i, k u^T>_F / (||A_i||_F ||k|| ||u||) = sum_r (p_r . k)(q_r . u) / (||A_i||_F ||k|| ||u||)

which for a rank-1 atom factorises as ``cos(p, k) * cos(q, u)`` (no matrix is built). Two write forms (§3.3):

- ``"beta"``: ``u_t = beta_t v_t``, the additive write ``beta_t k_t v_t^T`` (the paper's "native write");
- ``"delta"``: ``u_t = (S_t - a_t * S_{t-1})^T k_t / ||k_t||^2``, the value side of the exact change of the state
  apart from its decay: for Gated DeltaNet ``delta_t = beta_t (v_t - a_t S_{t-1}^T k_t)`` (the change is
  ``k_t delta_t^T`` exactly), for Mamba-2 (no erase) ``beta_t v_t`` again; for RWKV-7, whose erase runs along another
  key, the change is rank 2 and ``u_t`` is its part along the write key.

Per alive atom (fired at least once on the passages) the score is the **median** over its firings. The class rule:
register if the median is ``>= tau`` (default 0.05), bundle otherwise, null if the atom is dead. Gaussian mixtures
with 1-3 components (scikit-learn's ``GaussianMixture``, full covariance, ``n_init`` restarts, fixed seed), their BIC
and the bimodality coefficient describe the distribution of the medians. ``partition_atoms`` does all of it and
returns tables; ``partition_records.py`` joins the classes with substitution records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .firings import check_cell, head_states
from .passages import as_passages

WRITE_FORMS = ("beta", "delta")
REGISTER_THRESHOLD = 0.05
THRESHOLDS = (0.02, 0.03, 0.05, 0.10)
CLASSES = ("register", "bundle", "null")


# --- the cosine -------------------------------------------------------------------------------------------------


def write_cosines(
    key_factors: Float[Tensor, "n rank d_k"],
    value_factors: Float[Tensor, "n rank d_v"],
    keys: Float[Tensor, "n d_k"],
    values: Float[Tensor, "n d_v"],
    eps: float = 1e-30,
) -> Float[Tensor, " n"]:
    """Signed Frobenius cosine of each atom ``sum_r p_r q_r^T`` with the write ``k u^T``, from the factors only:
    ``sum_r (p_r . k)(q_r . u) / (||A||_F ||k|| ||u||)`` (rank 1: ``cos(p, k) * cos(q, u)``). In fp64."""
    p, q, k, u = (x.double() for x in (key_factors, value_factors, keys, values))
    inner = (torch.einsum("nrk,nk->nr", p, k) * torch.einsum("nrv,nv->nr", q, u)).sum(-1)  # <A, k u^T>_F
    return inner / (_atom_norms(p, q) * k.norm(dim=-1) * u.norm(dim=-1)).clamp_min(eps)


def pairwise_write_cosines(
    key_factors: Float[Tensor, "atom rank d_k"],
    value_factors: Float[Tensor, "atom rank d_v"],
    keys: Float[Tensor, "n d_k"],
    values: Float[Tensor, "n d_v"],
    eps: float = 1e-30,
) -> Float[Tensor, "atom n"]:
    """``write_cosines`` of every atom with every write (an [atom, n] table, no matrix built)."""
    p, q, k, u = (x.double() for x in (key_factors, value_factors, keys, values))
    inner = (torch.einsum("ark,nk->arn", p, k) * torch.einsum("arv,nv->arn", q, u)).sum(1)  # [atom, n]
    scale = _atom_norms(p, q)[:, None] * (k.norm(dim=-1) * u.norm(dim=-1))[None, :]
    return inner / scale.clamp_min(eps)


def _atom_norms(p: Tensor, q: Tensor) -> Tensor:
    """||sum_r p_r q_r^T||_F per atom from the factor Gram matrices."""
    key_gram = torch.einsum("nrk,nsk->nrs", p, p)
    value_gram = torch.einsum("nrv,nsv->nrs", q, q)
    return (key_gram * value_gram).sum((1, 2)).clamp_min(0).sqrt()


def delta_values(states: Float[Tensor, "batch pos d_k d_v"], keys: Float[Tensor, "batch pos d_k"],
                 log_decay: Tensor) -> Float[Tensor, "batch pos d_v"]:
    """The delta form's value side ``u_t = (S_t - a_t * S_{t-1})^T k_t / ||k_t||^2`` (``S_{-1} = 0``), with
    ``a_t = exp(log_decay)`` [batch, pos] or per key channel [batch, pos, d_k]."""
    decay = log_decay.float().exp()
    decay = decay[..., None, None] if decay.dim() == 2 else decay[..., :, None]  # over (d_k, d_v) or d_v
    previous = torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1)
    change = states - decay * previous  # [b, p, d_k, d_v]
    return torch.einsum("bpkv,bpk->bpv", change, keys) / keys.pow(2).sum(-1, keepdim=True).clamp_min(1e-30)


def value_sides(form: str, states: Tensor, factors: dict[str, Tensor]) -> Tensor:
    """``u_t`` of the write form ``form`` at every position, [batch, pos, d_v]."""
    if form == "beta":
        return factors["beta"][..., None] * factors["v"]
    if form == "delta":
        return delta_values(states, factors["k"], factors["decay"])
    raise ValueError(f"write form must be one of {WRITE_FORMS}, got {form!r}")


# --- scanning the passages --------------------------------------------------------------------------------------


@dataclass
class FiringCosines:
    """The cosines of every firing, and what the null reference needs."""

    firings: pd.DataFrame  # passage, position, atom, code, cos_beta, cos_delta
    alive: np.ndarray  # [d_sae] bool
    null_cosines: dict[str, np.ndarray] = field(default_factory=dict)  # form -> [n_dead, n_sampled] (may be empty)


def _factors_of(sae, atoms: Tensor) -> tuple[Tensor, Tensor]:
    index = atoms.to(sae.W_dec_key.device)
    return sae.W_dec_key.detach().float()[index].cpu(), sae.W_dec_value.detach().float()[index].cpu()


@torch.no_grad()
def firing_cosines(model, sae, layer: int, head: int, tokens, *, batch_size: int = 8, null_positions: int = 2048,
                   seed: int = 0, progress: bool = True) -> FiringCosines:
    """Encode every position's state of (layer, head) and compute, for each firing, the signed cosine of the
    atom with both write forms; also the cosines of the dead atoms with the writes at ``null_positions``
    positions drawn uniformly (seeded) from all scanned positions (the null reference)."""
    check_cell(model, sae, layer, head)
    tokens = as_passages(model, tokens)
    n_passages, n_pos = tokens.shape
    d_k, d_v = model.cfg.d_k, model.cfg.d_v
    rng = np.random.default_rng(seed)
    sampled = np.sort(rng.choice(n_passages * n_pos, min(null_positions, n_passages * n_pos), replace=False))
    parts, sample_keys, sample_values = [], [], {form: [] for form in WRITE_FORMS}
    alive = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for start in tqdm(range(0, n_passages, batch_size), desc="atom-write cosines", disable=not progress):
        batch = tokens[start : start + batch_size]
        states, factors = head_states(model, batch, layer, head)  # [b, p, d_k * d_v]
        factors = {name: x.float().cpu() for name, x in factors.items() if name in ("k", "v", "beta", "decay")}
        matrices = states.float().cpu().unflatten(-1, (d_k, d_v))
        codes = sae.encode(states.to(sae.device, sae.dtype)).float().cpu()  # [b, p, d_sae]
        b, t, f = (codes > 0).nonzero(as_tuple=True)
        alive[f] = True
        keys = factors["k"]
        sides = {form: value_sides(form, matrices, factors) for form in WRITE_FORMS}  # [b, p, d_v]
        p, q = _factors_of(sae, f)
        part = {"passage": (b + start).numpy(), "position": t.numpy(), "atom": f.numpy(),
                "code": codes[b, t, f].numpy()}
        for form in WRITE_FORMS:
            part[f"cos_{form}"] = write_cosines(p, q, keys[b, t], sides[form][b, t]).numpy()
        parts.append(pd.DataFrame(part))
        here = sampled[(sampled >= start * n_pos) & (sampled < (start + len(batch)) * n_pos)] - start * n_pos
        rows, cols = torch.as_tensor(here // n_pos), torch.as_tensor(here % n_pos)
        sample_keys.append(keys[rows, cols])
        for form in WRITE_FORMS:
            sample_values[form].append(sides[form][rows, cols])
    firings = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["passage", "position", "atom", "code", *(f"cos_{form}" for form in WRITE_FORMS)])
    dead = torch.nonzero(~alive).flatten()
    null = {}
    keys = torch.cat(sample_keys)
    for form in WRITE_FORMS:
        values = torch.cat(sample_values[form])
        if len(dead) == 0 or len(keys) == 0:
            null[form] = np.zeros((len(dead), 0))
            continue
        p, q = _factors_of(sae, dead)
        null[form] = torch.cat([pairwise_write_cosines(p[i : i + 256], q[i : i + 256], keys, values)
                                for i in range(0, len(dead), 256)]).numpy()  # [n_dead, n_sampled]
    return FiringCosines(firings, alive.numpy(), null)


# --- per-atom scores, classes, mixtures ---------------------------------------------------------------------------


def atom_medians(firings: pd.DataFrame, d_sae: int) -> pd.DataFrame:
    """One row per atom: ``n_firings`` and the medians of its firings' cosines (NaN for a dead atom)."""
    grouped = firings.groupby("atom")
    table = pd.DataFrame(index=pd.RangeIndex(d_sae, name="atom"))
    table["n_firings"] = grouped.size().reindex(table.index, fill_value=0).astype(np.int64)
    for form in WRITE_FORMS:
        table[f"median_cos_{form}"] = grouped[f"cos_{form}"].median().reindex(table.index)
    return table


def classify(medians, tau: float = REGISTER_THRESHOLD) -> np.ndarray:
    """``"register"`` where the median cosine is ``>= tau``, ``"bundle"`` below it, ``"null"`` where it is NaN
    (a dead atom)."""
    medians = np.asarray(medians, dtype=np.float64)
    return np.where(np.isnan(medians), "null", np.where(medians >= tau, "register", "bundle"))


def threshold_table(medians, taus=THRESHOLDS) -> pd.DataFrame:
    """Registers, bundles and null atoms for each threshold (paper Table 15)."""
    rows = []
    for tau in taus:
        classes = classify(medians, tau)
        rows.append({"tau": float(tau), **{name: int((classes == name).sum()) for name in CLASSES}})
    return pd.DataFrame(rows)


def mixture_fits(values, components=(1, 2, 3), *, n_init: int = 10, seed: int = 0) -> pd.DataFrame:
    """1-D Gaussian mixtures on ``values`` with scikit-learn (``GaussianMixture``, full covariance, ``n_init``
    restarts, ``random_state=seed``): one row per component count with the BIC, the mean log-likelihood per point
    and the fitted weights, means and standard deviations (sorted by mean)."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    if n_init < 1:
        raise ValueError(f"n_init must be positive, got {n_init}")
    rows = []
    for n in components:
        if len(x) < n:
            raise ValueError(f"a {n}-component mixture needs at least {n} values; got {len(x)} alive atoms")
        mixture = GaussianMixture(n_components=n, covariance_type="full", n_init=n_init, random_state=seed).fit(x)
        order = np.argsort(mixture.means_[:, 0])
        rows.append({
            "components": n, "bic": float(mixture.bic(x)), "mean_log_likelihood": float(mixture.score(x)),
            "weights": mixture.weights_[order].tolist(), "means": mixture.means_[order, 0].tolist(),
            "stds": np.sqrt(mixture.covariances_[order, 0, 0]).tolist(),
        })
    return pd.DataFrame(rows)


def bimodality_coefficient(values) -> float:
    """Sarle's bimodality coefficient ``(g^2 + 1) / (kappa + 3 (n-1)^2 / ((n-2)(n-3)))`` with the bias-corrected
    sample skewness g and excess kurtosis kappa (scipy); above 5/9 suggests bimodality. Needs n >= 4."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n < 4:
        raise ValueError(f"the bimodality coefficient needs at least 4 values, got {n}")
    g = stats.skew(x, bias=False)
    kappa = stats.kurtosis(x, bias=False)
    return float((g**2 + 1) / (kappa + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


# --- everything at once -----------------------------------------------------------------------------------------


@dataclass
class Partition:
    """The partition of one SAE's atoms on a set of passages (see ``partition_atoms``)."""

    firings: pd.DataFrame  # one row per firing: passage, position, atom, code, cos_beta, cos_delta
    atoms: pd.DataFrame  # one row per atom: n_firings, median_cos_beta, median_cos_delta, median_cos, class
    mixtures: pd.DataFrame  # one row per component count
    thresholds: pd.DataFrame  # tau, register, bundle, null
    summary: dict  # the summary numbers of paper §5.1


def partition_atoms(model, sae, layer: int, head: int, tokens, *, write_form: str = "beta",
                    tau: float = REGISTER_THRESHOLD, taus=THRESHOLDS, n_init: int = 10, seed: int = 0,
                    batch_size: int = 8, null_positions: int = 2048, progress: bool = True) -> Partition:
    """Cosines of every firing with the native write, per-atom medians, classes (by ``write_form``'s median at
    ``tau``), the threshold table, mixtures of 1-3 Gaussians on the alive atoms' medians and the summary."""
    if write_form not in WRITE_FORMS:
        raise ValueError(f"write_form must be one of {WRITE_FORMS}, got {write_form!r}")
    scan = firing_cosines(model, sae, layer, head, tokens, batch_size=batch_size, null_positions=null_positions,
                          seed=seed, progress=progress)
    atoms = atom_medians(scan.firings, sae.cfg.d_sae)
    atoms["median_cos"] = atoms[f"median_cos_{write_form}"]
    atoms["class"] = classify(atoms["median_cos"].to_numpy(), tau)
    medians = atoms["median_cos"].dropna().to_numpy()
    if medians.size < 4:
        raise ValueError(f"only {medians.size} atoms fire on these passages: too few to fit mixtures (need 4); "
                         "use more passages")
    mixtures = mixture_fits(medians, n_init=n_init, seed=seed)
    summary = summarize_partition(atoms, mixtures, scan.null_cosines[write_form], tau=tau, write_form=write_form)
    summary["bimodality_coefficient"] = bimodality_coefficient(medians)
    return Partition(scan.firings, atoms.reset_index(), mixtures, threshold_table(atoms["median_cos"], taus), summary)


def summarize_partition(atoms: pd.DataFrame, mixtures: pd.DataFrame, null_cosines: np.ndarray, *, tau: float,
                        write_form: str) -> dict:
    """The numbers of paper §5.1: counts per class, median and mean cosine per class, ratios, BICs."""
    by_class = {name: atoms.loc[atoms["class"] == name, "median_cos"] for name in ("register", "bundle")}
    bic = dict(zip(mixtures["components"], mixtures["bic"]))
    # the null reference: per dead atom the median cosine with writes at random positions, then the median of those
    null = float(np.median(np.median(null_cosines, axis=1))) if null_cosines.size else float("nan")
    register, bundle = float(by_class["register"].median()), float(by_class["bundle"].median())
    summary = {
        "write_form": write_form, "tau": tau, "n_atoms": len(atoms), "alive": int((atoms["class"] != "null").sum()),
        **{name: int((atoms["class"] == name).sum()) for name in CLASSES},
        "register_median_cos": register, "register_mean_cos": float(by_class["register"].mean()),
        "bundle_median_cos": bundle, "null_median_cos": null,
        "register_bundle_ratio": register / bundle if bundle else float("nan"),
        "register_null_ratio": register / null if null else float("nan"),
    }
    for n, value in bic.items():
        summary[f"bic_{n}"] = float(value)
    if 1 in bic and 2 in bic:
        summary["delta_bic_2_1"] = float(bic[2] - bic[1])
    if 2 in bic and 3 in bic:
        summary["delta_bic_3_2"] = float(bic[3] - bic[2])
        three = mixtures.loc[mixtures["components"] == 3].iloc[0]
        summary["smallest_weight_3"] = float(min(three["weights"]))
    return summary


def format_partition(summary: dict, thresholds: pd.DataFrame) -> str:
    """The summary as text."""
    s = summary
    lines = [
        f"Register / bundle partition ({s['write_form']} form of the write, tau = {s['tau']:g}): {s['n_atoms']} atoms, "
        f"{s['alive']} alive",
        f"  register {s['register']}  bundle {s['bundle']}  null (dead) {s['null']}",
        f"  median cosine: register {s['register_median_cos']:.4g} (mean {s['register_mean_cos']:.4g}), bundle "
        f"{s['bundle_median_cos']:.4g}, null {s['null_median_cos']:.4g}",
        f"  ratios: register/bundle {s['register_bundle_ratio']:.3g}x, register/null {s['register_null_ratio']:.3g}x",
        "  Gaussian mixtures on the alive atoms' medians: "
        + ", ".join(f"BIC({n}) = {s[f'bic_{n}']:.2f}" for n in (1, 2, 3) if f"bic_{n}" in s),
        f"  delta BIC(2 - 1) = {s.get('delta_bic_2_1', float('nan')):.2f}, delta BIC(3 - 2) = "
        f"{s.get('delta_bic_3_2', float('nan')):.2f} (smallest weight of 3: "
        f"{s.get('smallest_weight_3', float('nan')):.3f})",
        f"  bimodality coefficient {s.get('bimodality_coefficient', float('nan')):.3f} (> 0.555 suggests two modes)",
        "  thresholds:  " + "   ".join(f"tau {r.tau:g}: {r.register} reg / {r.bundle} bun"
                                       for r in thresholds.itertuples()),
    ]
    return "\n".join(lines)
