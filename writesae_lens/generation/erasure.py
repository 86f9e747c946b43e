"""Single-atom erasure (paper section 6.1): which token an atom promotes, what erasing it at its firings does to
that token, and what writing it where it does not fire does.

1. **Detection** (on half of the feature's firings, drawn with a fixed seed): at each firing t of feature i, delete the
   native write ``beta k v^T`` after the read at t and read the next-token distribution at t + 1; per token, sum
   ``log p_native - log p_delete`` over the firings. The arg max is the atom's *preferred token*.
2. **Erasure** (on the other half, at most ``n_eval`` firings): ``delta_delete`` = the change of log p(preferred) at
   t + 1 when the write is deleted (the primary edit), ``delta_atom`` = the change when only the atom's contribution
   ``a_i(t) A_i`` is subtracted (the secondary edit); medians with bootstrap CIs, means, Wilcoxon tests against 0,
   and the preferred token's median rank under each state.
3. **Writes at non-firing positions**: add ``m a* A_i`` (``a*`` = the median code over the feature's firings) at
   ``n_nonfiring`` positions where the feature is silent, for each m; and the dose table, ``n_dose`` positions times
   the ``dose_multipliers``, with a least-squares line of the change against m.

Every edit is a ``CacheEdit`` after the read at t, each row of the batched engine is one (firing, edit) teacher-forced
to t + 1 (``max_new_tokens=1``), so every number equals the hook path on the prefix alone.

Precision and floor (issue #18): the layers from the edited one on run in float32 whatever the model's dtype
(``engine.generate_rows``), and each change is a difference between rows of one call (native and edited rows of
the same prefix, the same computation). The floor: the evaluation firings' native rows run once more in a call of
their own (other batches); the largest |log p(preferred)| difference between the two computations of the same
number is ``result.floor``, and the summary reports it with the number of evaluation firings whose change (delete or
atom) is at or below it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from torch import Tensor

from ..evaluation.firings import scan_firings
from .edits import CacheEdit
from .engine import generate_rows
from .stats import bootstrap_interval, signed_rank_p


@dataclass(frozen=True)
class ErasureSettings:
    n_eval: int = 150
    n_nonfiring: int = 150
    multipliers: tuple[float, ...] = (1.0, 2.0, 4.0)
    n_dose: int = 50
    dose_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    seed: int = 2026
    n_resamples: int = 10_000


@dataclass
class ErasureResult:
    feature: int
    preferred_token: int
    a_star: float
    detection: pd.DataFrame  # token, summed_diff (the 20 largest), over the detection firings
    erasure: pd.DataFrame  # one row per evaluation firing
    nonfiring: pd.DataFrame  # one row per (non-firing position, m)
    dose: pd.DataFrame  # one row per (dose position, m)
    summary: dict = field(default_factory=dict)
    floor: float = float("nan")  # the largest |log p| between two computations of the same native rows


def atom_edits(sae, feature: int, row: int, position: int, layer: int, head: int,
               coefficient: float) -> list[CacheEdit]:
    """``coefficient * A_i`` as rank-1 cache edits, one per decoder component ``p_r q_r^T``."""
    keys = sae.W_dec_key.detach().float().cpu()[feature]  # [rank, d_k]
    values = sae.W_dec_value.detach().float().cpu()[feature]  # [rank, d_v]
    return [CacheEdit(row, position, layer, head, value=values[r], key=keys[r], scale=float(coefficient))
            for r in range(keys.shape[0])]


def delete_edit(row: int, position: int, layer: int, head: int) -> CacheEdit:
    """``-beta k v^T``: the native write removed (after the read)."""
    return CacheEdit(row, position, layer, head, scale=-1.0, relative=True)


@torch.no_grad()
def erasure_probe(model, sae, layer: int, head: int, feature: int, passages: Tensor,
                  settings: ErasureSettings = ErasureSettings(), *, batch_size: int = 128,
                  progress: bool = False, precision: str = "float32") -> ErasureResult:
    """The three steps of the module docstring on ``passages`` [n, n_pos]. ``precision``: that of the layers from
    ``layer`` on (``engine.generate_rows``)."""
    run = dict(precision=precision, tail_from=layer)
    if not 0 <= feature < sae.cfg.d_sae:
        raise ValueError(f"feature {feature} is out of range; the SAE has features 0..{sae.cfg.d_sae - 1}")
    passages = torch.as_tensor(passages).long()
    scan = scan_firings(model, sae, layer, head, passages.to(model.cfg.device), progress=progress)
    last = passages.shape[1] - 1
    fires = (scan.feature == feature) & (scan.position < last)
    firings = list(zip(scan.passage[fires].tolist(), scan.position[fires].tolist(), scan.code[fires].tolist()))
    if len(firings) < 2:
        raise ValueError(f"feature {feature} fires {len(firings)} time(s) before the passages' last position at layer "
                         f"{layer} head {head}; the probe needs at least 2 (one to detect, one to evaluate)")
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(len(firings))
    half = len(firings) // 2
    detect = [firings[i] for i in sorted(order[:half])]
    evaluate = [firings[i] for i in sorted(order[half:])][: settings.n_eval]
    a_star = float(np.median([c for _, _, c in firings]))

    prefix = lambda p, t: passages[p, : t + 2]  # noqa: E731  the output at t + 1 is the last
    # 1. detection: native and delete rows per detection firing, whole next-token distributions
    rows, edits = [], []
    for p, t, _ in detect:
        rows += [prefix(p, t), prefix(p, t)]
        edits.append(delete_edit(len(rows) - 1, t, layer, head))
    out = generate_rows(model, rows, max_new_tokens=1, edits=edits, keep_first_logprobs=True, batch_size=batch_size,
                        **run)
    diffs = (out.first_logprobs[0::2] - out.first_logprobs[1::2]).sum(0)  # [d_vocab]
    top = torch.topk(diffs, min(20, len(diffs)))
    preferred = int(top.indices[0])
    detection = pd.DataFrame({"token": top.indices.tolist(), "summed_diff": top.values.tolist()})

    # 2. erasure at the evaluation firings: native, delete, atom rows watching the preferred token
    rows, edits = [], []
    for p, t, code in evaluate:
        base = len(rows)
        rows += [prefix(p, t)] * 3
        edits.append(delete_edit(base + 1, t, layer, head))
        edits += atom_edits(sae, feature, base + 2, t, layer, head, -code)
    lp, rank = _watch_first(model, rows, edits, preferred, batch_size, run)
    again, _ = _watch_first(model, rows[0::3], [], preferred, batch_size, run)  # the native rows alone
    floor = float(np.abs(again - lp[0::3]).max())
    erasure = pd.DataFrame({
        "passage": [p for p, _, _ in evaluate], "position": [t for _, t, _ in evaluate],
        "code": [c for _, _, c in evaluate],
        "delta_delete": lp[1::3] - lp[0::3], "delta_atom": lp[2::3] - lp[0::3],
        "rank_native": rank[0::3], "rank_delete": rank[1::3], "rank_atom": rank[2::3],
    })

    # 3. writes of m a* A_i where the feature is silent, and the dose table
    silent = _silent_positions(scan, feature, passages.shape[0], last, rng)
    nonfiring = _write_rows(model, sae, layer, head, feature, passages, silent[: settings.n_nonfiring],
                            settings.multipliers, a_star, preferred, batch_size, run)
    dose = _write_rows(model, sae, layer, head, feature, passages, silent[: settings.n_dose],
                       settings.dose_multipliers, a_star, preferred, batch_size, run)
    result = ErasureResult(feature, preferred, a_star, detection, erasure, nonfiring, dose, floor=floor)
    result.summary = summarize_erasure(result, settings)
    return result


def _watch_first(model, rows, edits, token: int, batch_size: int, run: dict) -> tuple[np.ndarray, np.ndarray]:
    out = generate_rows(model, rows, max_new_tokens=1, edits=edits, watch=torch.full((len(rows), 1), token),
                        batch_size=batch_size, **run)
    return out.watch_logp[:, 0, 0].numpy().astype(float), out.watch_rank[:, 0, 0].numpy()


def _silent_positions(scan, feature: int, n_passages: int, last: int, rng) -> list[tuple[int, int]]:
    """Positions (before the last) where the feature's code is zero, in a seeded random order."""
    firing = set(zip(scan.passage[scan.feature == feature].tolist(), scan.position[scan.feature == feature].tolist()))
    pool = [(p, t) for p in range(n_passages) for t in range(last) if (p, t) not in firing]
    return [pool[i] for i in rng.permutation(len(pool))]


def _write_rows(model, sae, layer, head, feature, passages, positions, multipliers, a_star, token, batch_size, run):
    rows, edits = [], []
    for p, t in positions:
        rows.append(passages[p, : t + 2])
        for m in multipliers:
            rows.append(passages[p, : t + 2])
            edits += atom_edits(sae, feature, len(rows) - 1, t, layer, head, m * a_star)
    if not rows:
        return pd.DataFrame(columns=["passage", "position", "m", "delta"])
    lp, _ = _watch_first(model, rows, edits, token, batch_size, run)
    stride = 1 + len(multipliers)
    records = []
    for i, (p, t) in enumerate(positions):
        for j, m in enumerate(multipliers):
            records.append(dict(passage=p, position=t, m=m, delta=lp[i * stride + 1 + j] - lp[i * stride]))
    return pd.DataFrame(records)


def summarize_erasure(result: ErasureResult, settings: ErasureSettings) -> dict:
    e = result.erasure
    summary = {"feature": result.feature, "preferred_token": result.preferred_token, "a_star": result.a_star,
               "detection_summed_diff": float(result.detection.summed_diff.iloc[0]), "n_eval": len(e)}
    for edit in ("delete", "atom"):
        d = e[f"delta_{edit}"].to_numpy()
        low, high = bootstrap_interval(d, np.median, n_resamples=settings.n_resamples, seed=settings.seed)
        summary[edit] = {"median": float(np.median(d)), "ci_low": low, "ci_high": high, "mean": float(d.mean()),
                         "wilcoxon_p": signed_rank_p(d), "median_rank": float(np.median(e[f"rank_{edit}"]))}
    summary["median_rank_native"] = float(np.median(e.rank_native))
    if np.isfinite(result.floor):
        smallest = np.minimum(e.delta_delete.abs().to_numpy(), e.delta_atom.abs().to_numpy())
        summary["floor"] = {"floor": result.floor, "below_floor": int((smallest <= result.floor).sum())}
    summary["nonfiring"] = {float(m): {"n": len(g), "median": float(g.delta.median()), "wilcoxon_p":
                                       signed_rank_p(g.delta.to_numpy())} for m, g in result.nonfiring.groupby("m")}
    if len(result.dose) > 2 and result.dose.m.nunique() > 1:
        fit = sps.linregress(result.dose.m.to_numpy(float), result.dose.delta.to_numpy(float))
        summary["dose_fit"] = {"slope": float(fit.slope), "intercept": float(fit.intercept), "p": float(fit.pvalue),
                               "r": float(fit.rvalue), "n": len(result.dose)}
    return summary


def format_erasure_summary(result: ErasureResult, token_text: str | None = None) -> str:
    s = result.summary
    name = f"{result.preferred_token}" + (f" ({token_text!r})" if token_text is not None else "")
    lines = [f"Single-atom erasure, feature {result.feature}: preferred token {name}, summed detection difference "
             f"{s['detection_summed_diff']:.3g} nats; a* = {result.a_star:.3g}",
             f"  at {s['n_eval']} evaluation firings, change of log p(preferred) at the next token:"]
    for edit, label in (("delete", "delete the write"), ("atom", "erase the atom")):
        d = s[edit]
        lines.append(f"    {label:<17} median {d['median']:+.4g} [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]  mean "
                     f"{d['mean']:+.4g}  Wilcoxon p = {d['wilcoxon_p']:.3g}  median rank {s['median_rank_native']:.0f}"
                     f" -> {d['median_rank']:.0f}")
    if "floor" in s:
        lines.append(f"  numerical floor (|log p| between two computations of the native rows): {s['floor']['floor']:.3g};"
                     f" firings with a change at or below it: {s['floor']['below_floor']} of {s['n_eval']}")
    lines.append("  writes of m a* A at non-firing positions:")
    for m, d in s["nonfiring"].items():
        lines.append(f"    m = {m:g}: n = {d['n']}, median {d['median']:+.4g}, Wilcoxon p = {d['wilcoxon_p']:.3g}")
    if "dose_fit" in s:
        f = s["dose_fit"]
        lines.append(f"  dose response ({f['n']} writes): slope {f['slope']:+.4g} per unit m, p = {f['p']:.3g}")
    return "\n".join(lines)


def plot_dose(result: ErasureResult, path) -> None:
    """The change of log p(preferred) against m at non-firing positions (points and medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    d = result.dose
    ax.scatter(d.m, d.delta, s=8, alpha=0.4)
    medians = d.groupby("m").delta.median()
    ax.plot(medians.index, medians.values, marker="o", color="black", label="median")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("m (times a*)")
    ax.set_ylabel("change of log p(preferred)")
    ax.set_title(f"Feature {result.feature}: writes where it is silent")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
