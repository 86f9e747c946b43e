"""Per-atom dashboard data: what each page shows, as dataclasses holding pandas tables (``atom_dashboards``).

Decisions (``docs/dashboards.md`` says why):

- atoms: the ``atoms`` given, else the first ``n_atoms`` atoms (by index) that fire at least once in the scan;
- token alignment uses the *mean native key / value vector per token over the scan* (``hook_write_k`` /
  ``hook_write_v`` of the head, after its convolution and norms), not the embedding pushed through the projections:
  the write at a token depends on its context (short convolution, gates), and the mean over the scan is what the
  state actually received; tokens seen fewer than ``min_token_count`` times are left out;
- the logit effect is the closed form's direct out-path ``<W_O[h] q, W_U[:, tok]>`` (``evaluation.logit_shift``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..evaluation.logit_shift import head_output_matrix, out_path_logits
from . import stats
from .scan import DashboardScan


@dataclass
class AtomDashboard:
    """Everything one atom's page shows. Token ids only: ``token_text`` maps them to strings."""

    atom: int
    activation: dict  # stats.activation_summary: density, max, mean, median, histogram
    top_contexts: pd.DataFrame  # stats.top_contexts
    key_tokens: pd.DataFrame  # stats.aligned_tokens for p
    value_tokens: pd.DataFrame  # stats.aligned_tokens for q
    logit_effects: pd.DataFrame  # stats.logit_effects
    logit_histogram: dict  # stats.histogram of the out-path over the vocabulary (component 0)
    factor_norms: dict  # {"p": [R], "q": [R]} Euclidean norms of the factors
    partition: dict | None = None  # {"class", "median_cos", "n_firings"} from atoms.csv of `writesae partition`
    substitution: dict | None = None  # stats.win_rates row: n, wins, win_rate, low, high


@dataclass
class DashboardData:
    """The dashboards of one cell: per-atom data plus what the index shows."""

    model_name: str
    layer: int
    head: int
    d_sae: int
    rank: int
    n_passages: int
    n_pos: int
    atoms: list[AtomDashboard]
    firing_counts: np.ndarray  # [d_sae] firings of every atom in the scan
    token_text: dict[int, str] = field(default_factory=dict)  # every token id any page shows -> its text


def choose_atoms(firing_counts: np.ndarray, atoms: list[int] | None, n_atoms: int | None) -> list[int]:
    """The atoms given (checked against d_sae, duplicates removed, order kept), else the first ``n_atoms`` alive
    atoms by index (all alive atoms when ``n_atoms`` is None)."""
    d_sae = len(firing_counts)
    if atoms is not None:
        bad = [a for a in atoms if not isinstance(a, (int, np.integer)) or not 0 <= a < d_sae]
        if bad:
            raise ValueError(f"atoms {bad} are out of range; this SAE has atoms 0..{d_sae - 1}")
        return list(dict.fromkeys(int(a) for a in atoms))
    if n_atoms is not None and n_atoms < 1:
        raise ValueError(f"n_atoms must be a positive integer, got {n_atoms!r}")
    alive = np.flatnonzero(firing_counts > 0).tolist()
    return alive if n_atoms is None else alive[:n_atoms]


def atom_dashboards(model, sae, scan: DashboardScan, *, atoms: list[int] | None = None, n_atoms: int | None = 64,
                    n_contexts: int = 10, left: int = 12, right: int = 4, n_tokens: int = 10,
                    min_token_count: int = 3, bins: int = 30, partition: pd.DataFrame | None = None,
                    records: pd.DataFrame | None = None, progress: bool = True) -> DashboardData:
    """The dashboard data of the chosen atoms from one scan (``scan_for_dashboards``). ``partition``: the
    ``atoms.csv`` table of ``writesae partition``; ``records``: a substitution run's records (same SAE)."""
    for name, value in (("n_contexts", n_contexts), ("n_tokens", n_tokens), ("min_token_count", min_token_count),
                        ("bins", bins)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if left < 0 or right < 0:
        raise ValueError(f"left and right must be >= 0, got {left}, {right}")
    d_sae = sae.cfg.d_sae
    firing_counts = np.bincount(scan.feature, minlength=d_sae)
    chosen = choose_atoms(firing_counts, atoms, n_atoms)
    partition_rows = _partition_rows(partition, d_sae)
    win_rows = _win_rows(records)

    mixer = model.blocks[scan.layer].mixer
    keys = sae.W_dec_key.detach().double().cpu()  # [d_sae, R, d_k]
    values = sae.W_dec_value.detach().double().cpu()  # [d_sae, R, d_v]
    w_o = head_output_matrix(mixer, scan.head).detach().double().cpu()  # [d_model, d_v]
    w_u = model.W_U.detach().double().cpu()  # [d_model, d_vocab]
    key_ids, key_means = stats.token_means(scan.key_sums, scan.token_counts, min_token_count)
    value_ids, value_means = stats.token_means(scan.value_sums, scan.token_counts, min_token_count)
    signed = keys.shape[1] == 1

    pages = []
    for atom in tqdm(chosen, desc="dashboard data", unit="atom", disable=not progress):
        rows = stats.atom_firings(scan.feature, atom)
        grid = stats.atom_code_grid(scan.passage, scan.position, scan.code, rows, *scan.tokens.shape)
        top = stats.top_firings(scan.code, rows, n_contexts)
        out_path = out_path_logits(w_o, w_u, values[atom])  # [R, d_vocab]
        pages.append(AtomDashboard(
            atom=atom,
            activation=stats.activation_summary(scan.code[rows], scan.n_positions, bins),
            top_contexts=stats.top_contexts(scan.tokens, grid, scan.passage, scan.position, scan.code, top, left,
                                            right),
            key_tokens=stats.aligned_tokens(key_ids, scan.token_counts,
                                            stats.factor_alignment(keys[atom], key_means), n_tokens, signed),
            value_tokens=stats.aligned_tokens(value_ids, scan.token_counts,
                                              stats.factor_alignment(values[atom], value_means), n_tokens, signed),
            logit_effects=stats.logit_effects(out_path, n_tokens),
            logit_histogram=stats.histogram(out_path[0].numpy(), bins),
            factor_norms={"p": keys[atom].norm(dim=-1).tolist(), "q": values[atom].norm(dim=-1).tolist()},
            partition=partition_rows.get(atom),
            substitution=win_rows.get(atom),
        ))
    data = DashboardData(model_name=str(model.cfg.model_name), layer=scan.layer, head=scan.head, d_sae=d_sae,
                         rank=int(keys.shape[1]), n_passages=scan.tokens.shape[0], n_pos=scan.tokens.shape[1],
                         atoms=pages, firing_counts=firing_counts)
    data.token_text = token_texts(model, _shown_tokens(pages))
    return data


def _partition_rows(partition: pd.DataFrame | None, d_sae: int) -> dict[int, dict]:
    if partition is None:
        return {}
    missing = [c for c in ("atom", "class", "median_cos") if c not in partition.columns]
    if missing:
        raise KeyError(f"the partition table (atoms.csv of `writesae partition`) lacks columns {missing}")
    if len(partition) and (partition["atom"].max() >= d_sae or partition["atom"].min() < 0):
        raise ValueError(f"the partition table names atoms outside 0..{d_sae - 1}: it belongs to another SAE")
    rows = {}
    for row in partition.to_dict("records"):
        median = row["median_cos"]
        rows[int(row["atom"])] = {"class": str(row["class"]),
                                  "median_cos": None if median is None or math.isnan(median) else float(median),
                                  "n_firings": int(row["n_firings"]) if "n_firings" in row else None}
    return rows


def _win_rows(records: pd.DataFrame | None) -> dict[int, dict]:
    if records is None:
        return {}
    missing = [c for c in ("atom", "kl_atom", "kl_delete") if c not in records.columns]
    if missing:
        raise KeyError(f"the substitution records lack columns {missing}")
    return {int(row.pop("atom")): row for row in stats.win_rates(records).to_dict("records")}


def _shown_tokens(pages: list[AtomDashboard]) -> set[int]:
    shown: set[int] = set()
    for page in pages:
        for ids in page.top_contexts["context_tokens"]:
            shown.update(ids)
        for table in (page.key_tokens, page.value_tokens, page.logit_effects):
            shown.update(table["token"].tolist())
    return shown


def token_texts(model, ids: set[int]) -> dict[int, str]:
    """Each id's text through the model's tokenizer (``decode([id])``), or ``<id>`` where there is none."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return {i: f"<{i}>" for i in ids}
    return {i: tokenizer.decode([i]) for i in sorted(ids)}


def build_dashboard_data(model, sae, layer: int, head: int, tokens: torch.Tensor, *, batch_size: int = 8,
                         ignore_sae_metadata: bool = False, progress: bool = True, **options) -> DashboardData:
    """Scan ``tokens`` and build the dashboard data in one call (``options``: those of ``atom_dashboards``)."""
    from .scan import scan_for_dashboards

    scan = scan_for_dashboards(model, sae, layer, head, tokens, batch_size=batch_size, progress=progress,
                               ignore_sae_metadata=ignore_sae_metadata)
    return atom_dashboards(model, sae, scan, progress=progress, **options)
