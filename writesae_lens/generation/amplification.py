"""The amplification probe (paper section 6.4): push a layer's sentence-boundary features up at every decoding step,
in all heads, and measure the text sampled.

1. **Selection** (per head, one SAE per head): a position is a *boundary* when the next token is the boundary token
   ("." by default). From the passages' per-position states of the head, sample min(#boundary, #other, ``max_samples``)
   of each kind (seeded), encode them, and keep the ``n_top`` features with the largest |mean code at boundaries -
   mean code elsewhere| (zeros included). A feature's push at dose x is ``sign(mean_diff) |mean code at boundaries| x``.
2. **Random control**: ``n_top`` alive features per head (non-zero on ``n_control_states`` sampled states, the boundary
   features left out), pushed by ``|their mean code over those states| x random_dose``.
3. **Generation**: prompts x conditions (baseline, each dose, the random control) as rows of the batched engine, each
   sampled at ``temperature`` from the full softmax for ``max_new_tokens`` tokens with its own seed (per prompt x
   condition). A condition adds ``Delta S_h = sum_f push_f A_f`` to every head's state after every generated token's
   read (``edits.Push``); for a linear decoder this is exactly encode, add the pushes to the codes, decode and add
   back the SAE's residual, without calling the SAE in the loop.
4. **Metrics and statistics**: newlines, paragraphs (``"\\n\\n"`` count + 1) and mean word length of the decoded
   continuation; per condition the mean with a bootstrap CI; against the baseline the paired t-test, Cohen's d_z, a
   bootstrap CI of the mean difference, and Bonferroni-adjusted p over the compared conditions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..evaluation.firings import check_cell, head_states
from ..interventions import atom_matrices
from .edits import Push
from .engine import generate_rows
from .stats import bonferroni, bootstrap_interval, paired_difference

METRICS = ("newlines", "paragraphs", "mean_word_length")


@dataclass(frozen=True)
class AmplificationSettings:
    doses: tuple[float, ...] = (2.0, 5.0, 10.0)
    random_dose: float = 10.0
    n_top: int = 10
    max_samples: int = 10_000
    n_control_states: int = 5_000
    selection_seed: int = 123
    max_new_tokens: int = 400
    temperature: float = 0.7
    seed: int = 2026
    n_resamples: int = 10_000


@dataclass
class AmplificationResult:
    features: pd.DataFrame  # head, feature, kind (boundary | random), mean_diff, push_unit (push at dose 1)
    records: pd.DataFrame  # prompt, condition, text, and the METRICS
    summary: pd.DataFrame  # per condition and metric: mean, CI, and the paired comparison with the baseline
    conditions: list[str] = field(default_factory=list)
    floor: dict = field(default_factory=dict)  # the baseline sampled twice (numerical_floor): see sampling_floor


REPEAT = "baseline (repeat)"


def boundary_mask(tokens: Tensor, boundary_token: int) -> Tensor:
    """[n, pos] bool: the next token is ``boundary_token`` (the last position never is)."""
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, :-1] = tokens[:, 1:] == boundary_token
    return mask


def text_metrics(text: str) -> dict[str, float]:
    words = text.split()
    return {"newlines": float(text.count("\n")), "paragraphs": float(text.count("\n\n") + 1),
            "mean_word_length": float(np.mean([len(w) for w in words])) if words else 0.0}


@torch.no_grad()
def select_features(model, saes: dict[int, object], layer: int, passages: Tensor, boundary_token: int,
                    settings: AmplificationSettings = AmplificationSettings()) -> pd.DataFrame:
    """The boundary features and the random-control features of every head (steps 1 and 2)."""
    boundary = boundary_mask(passages.cpu(), boundary_token).flatten()
    n_b, n_o = int(boundary.sum()), int((~boundary).sum())
    n = min(n_b, n_o, settings.max_samples)
    if n == 0:
        raise ValueError(f"the passages hold no position followed by the boundary token {boundary_token} (or no "
                         "other position): no boundary features to select")
    rows = []
    for head, sae in saes.items():
        check_cell(model, sae, layer, head)
        states, _ = head_states(model, passages.to(model.cfg.device), layer, head)
        states = states.flatten(0, 1).cpu()  # [n * pos, d_k * d_v]
        rng = np.random.default_rng(settings.selection_seed)
        pick_b = rng.choice(np.flatnonzero(boundary.numpy()), n, replace=False)
        pick_o = rng.choice(np.flatnonzero(~boundary.numpy()), n, replace=False)
        encode = lambda s: sae.encode(s.to(sae.device, sae.dtype)).float().cpu()  # noqa: E731
        code_b, code_o = encode(states[pick_b]), encode(states[pick_o])
        mean_b, mean_diff = code_b.mean(0), code_b.mean(0) - code_o.mean(0)
        top = torch.topk(mean_diff.abs(), min(settings.n_top, len(mean_diff))).indices
        rows += [dict(head=head, feature=int(f), kind="boundary", mean_diff=float(mean_diff[f]),
                      push_unit=float(torch.sign(mean_diff[f]) * mean_b[f].abs())) for f in top]
        control = rng.choice(len(states), min(settings.n_control_states, len(states)), replace=False)
        code_c = encode(states[control])
        alive = (code_c != 0).any(0)
        alive[top] = False
        candidates = np.flatnonzero(alive.numpy())
        chosen = rng.choice(candidates, min(settings.n_top, len(candidates)), replace=False)
        rows += [dict(head=head, feature=int(f), kind="random", mean_diff=float(mean_diff[f]),
                      push_unit=float(code_c[:, f].mean().abs())) for f in chosen]
    return pd.DataFrame(rows, columns=["head", "feature", "kind", "mean_diff", "push_unit"])


def push_matrix(sae, features: list[int], pushes: list[float]) -> Tensor:
    """``sum_f push_f A_f`` [d_k, d_v]: what pushing the codes by ``pushes`` adds to a linear decoder's output."""
    atoms = atom_matrices(sae, torch.tensor(features, dtype=torch.long), len(features))  # [n, d_k, d_v]
    return (torch.tensor(pushes, dtype=torch.float32)[:, None, None] * atoms).sum(0)


def condition_pushes(saes, features: pd.DataFrame, settings: AmplificationSettings) -> dict[str, dict[int, Tensor]]:
    """Per condition, per head, the matrix added at every decoding step (baseline: none)."""
    conditions: dict[str, dict[int, Tensor]] = {"baseline": {}}
    for dose in settings.doses:
        conditions[f"{dose:g}x"] = {}
    conditions[f"random {settings.random_dose:g}x"] = {}
    for head, sae in saes.items():
        mine = features[features["head"] == head]
        boundary, random = mine[mine.kind == "boundary"], mine[mine.kind == "random"]
        for dose in settings.doses:
            conditions[f"{dose:g}x"][head] = push_matrix(sae, boundary.feature.tolist(),
                                                         (boundary.push_unit * dose).tolist())
        if len(random):
            conditions[f"random {settings.random_dose:g}x"][head] = push_matrix(
                sae, random.feature.tolist(), (random.push_unit * settings.random_dose).tolist())
    return conditions


@torch.no_grad()
def amplification_probe(model, saes: dict[int, object], layer: int, prompts: list[Tensor], passages: Tensor,
                        boundary_token: int, settings: AmplificationSettings = AmplificationSettings(), *,
                        batch_size: int = 64, progress: bool = False,
                        precision: str = "float32") -> AmplificationResult:
    """The probe of the module docstring; ``precision``: that of the layers from ``layer`` on
    (``engine.generate_rows``; every condition, the baseline included, runs through that same computation)."""
    if model.tokenizer is None:
        raise ValueError("the amplification probe measures decoded text: the model needs a tokenizer")
    if not saes:
        raise ValueError("give one SAE per head: {head: sae}")
    if not 0 <= boundary_token < model.cfg.d_vocab:
        raise ValueError(f"boundary token {boundary_token} lies outside the vocabulary (0..{model.cfg.d_vocab - 1})")
    features = select_features(model, saes, layer, passages, boundary_token, settings)
    conditions = condition_pushes(saes, features, settings)
    names = list(conditions)
    rows, pushes, seeds, meta = [], [], [], []
    for p, prompt in enumerate(prompts):
        for c, name in enumerate(names):
            row = len(rows)
            rows.append(torch.as_tensor(prompt).long())
            pushes += [Push(row, layer, head, matrix) for head, matrix in conditions[name].items()]
            seeds.append(int(np.random.SeedSequence([settings.seed, p, c]).generate_state(1)[0]))
            meta.append((p, name))
        # the numerical floor: the baseline once more, same prompt and seed, in another row of the same call
        rows.append(torch.as_tensor(prompt).long())
        seeds.append(int(np.random.SeedSequence([settings.seed, p, 0]).generate_state(1)[0]))
        meta.append((p, REPEAT))
    out = generate_rows(model, rows, max_new_tokens=settings.max_new_tokens, pushes=pushes, do_sample=True,
                        temperature=settings.temperature, seeds=seeds, batch_size=batch_size, progress=progress,
                        precision=precision, tail_from=layer)
    records = []
    for r, (p, name) in enumerate(meta):
        text = model.tokenizer.decode(out.tokens[r].tolist(), skip_special_tokens=True)
        records.append(dict(prompt=p, condition=name, text=text, **text_metrics(text)))
    records = pd.DataFrame(records)
    floor = sampling_floor(records)
    records = records[records.condition != REPEAT].reset_index(drop=True)
    return AmplificationResult(features, records, summarize_amplification(records, names, settings), names, floor)


def sampling_floor(records: pd.DataFrame) -> dict:
    """The baseline and its repeat (same prompt, same seed, another row of the same batched call) should give the
    same text: how many prompts' texts differ, and the largest |difference| of each metric between the two (all 0
    when the computation does not depend on the row; a difference would be the arithmetic's, not an edit's)."""
    base = records[records.condition == "baseline"].set_index("prompt")
    repeat = records[records.condition == REPEAT].set_index("prompt").reindex(base.index)
    return {"prompts": int(len(base)), "texts_differ": int((base["text"] != repeat["text"]).sum()),
            **{f"max_diff_{m}": float((base[m] - repeat[m]).abs().max()) for m in METRICS}}


def summarize_amplification(records: pd.DataFrame, conditions: list[str],
                            settings: AmplificationSettings = AmplificationSettings()) -> pd.DataFrame:
    """Per condition and metric: mean and bootstrap CI; against the baseline (paired by prompt): mean difference,
    its bootstrap CI, the paired t-test, Cohen's d_z and Bonferroni-adjusted p over the compared conditions."""
    wide = {m: records.pivot(index="prompt", columns="condition", values=m) for m in METRICS}
    rows = []
    for metric in METRICS:
        table = wide[metric]
        base = table["baseline"].to_numpy(float)
        compared = [c for c in conditions if c != "baseline"]
        for c in conditions:
            values = table[c].to_numpy(float)
            low, high = bootstrap_interval(values, np.mean, n_resamples=settings.n_resamples, seed=settings.seed)
            row = dict(metric=metric, condition=c, n=len(values), mean=float(values.mean()), ci_low=low, ci_high=high)
            if c != "baseline" and len(values) >= 2:
                d = paired_difference(values, base, n_resamples=settings.n_resamples, seed=settings.seed)
                row.update(mean_diff=d.mean_diff, diff_low=d.ci_low, diff_high=d.ci_high, t=d.t, p=d.p_value,
                           cohens_dz=d.cohens_dz, p_adj=float(bonferroni([d.p_value], len(compared))[0]))
            rows.append(row)
    return pd.DataFrame(rows)


def format_amplification_summary(summary: pd.DataFrame, floor: dict | None = None) -> str:
    lines = ["Amplification probe: sampled continuations, paired by prompt against the baseline"]
    if floor:
        lines.append(f"  numerical floor: the baseline sampled twice (same seed, another row of the same call) gives "
                     f"another text for {floor['texts_differ']} of {floor['prompts']} prompts; largest metric "
                     "difference " + ", ".join(f"{m} {floor[f'max_diff_{m}']:.3g}" for m in METRICS))
    for metric, g in summary.groupby("metric", sort=False):
        lines.append(f"  {metric}")
        for _, r in g.iterrows():
            line = f"    {r.condition:<12} mean {r['mean']:8.3f} [{r.ci_low:8.3f}, {r.ci_high:8.3f}]"
            if r.condition != "baseline" and "p" in r and not pd.isna(r.get("p")):
                line += (f"  diff {r.mean_diff:+.3f} [{r.diff_low:+.3f}, {r.diff_high:+.3f}]  t = {r.t:+.2f}  "
                         f"p = {r.p:.3g}  d_z = {r.cohens_dz:+.2f}  p_adj = {r.p_adj:.3g}")
            lines.append(line)
    return "\n".join(lines)


def plot_amplification(summary: pd.DataFrame, path) -> None:
    """Per metric, the condition means with their bootstrap CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(summary.metric))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4))
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        g = summary[summary.metric == metric]
        x = np.arange(len(g))
        ax.errorbar(x, g["mean"], yerr=[g["mean"] - g.ci_low, g.ci_high - g["mean"]], fmt="o", capsize=3)
        ax.set_xticks(x, g.condition, rotation=30, fontsize=8)
        ax.set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
