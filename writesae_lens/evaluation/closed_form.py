"""The closed-form logit-shift audit (paper section 2, appendix A "Experiment C", 3.7 selectivity, 6.2 sign).

``logit_shift_audit(model, sae, layer, head, prompts)`` perturbs head ``head``'s state at ``t0 = t - h`` (t = each
prompt's last position) by ``eps * A_i`` for sampled alive atoms i, every eps of the grid and every horizon h, and
records, at the 64 eval tokens of each atom, three numbers per (prompt, atom, eps, h, token):

- ``measured``: the exact logit shift at t (``state_perturbation``: S_{t0} perturbed, positions t0+1..t recomputed);
- ``predicted``: the paper's parameter-free closed form ``eps * G * <p_i, q_t> * <W_O[h] q_i, W_U[tok]>``
  (``logit_shift``; G = the product of the decays); the fitted-scale reading is the same column with one
  least-squares scale per cell, applied in ``closed_form_summary``;
- ``first_order``: the exact first-order shift, ``eps`` times the forward-mode JVP of the logits at t along ``A_i``.

Decisions (the paper leaves them open): eval tokens = the 64 tokens with the largest ``|<W_O[h] q_i, W_U[tok]>|``
per atom (fixed per atom, so that a cell (atom, eps, h, eval rank) is one token across prompts); atoms = 50 alive
atoms drawn with ``seed`` (alive = fires on these prompts); eps grid = appendix A's {0.1, 0.3, 1, 3} (the
pre-registered {0.25, 0.5, 0.75, 1} is ``EPS_GRIDS["preregistered"]``); horizons {0, 1, 4, 16}; ``A_i`` is the
SAE's own decoder matrix ``sum_r p_r q_r^T`` (factors as trained, not renormalised).

Beside the records: the single-position sign prediction of 6.2 (``sign_trials``: ``m * u v_T*^T`` at t with ``u``
the atom's unit key factor, ``v_T*`` the unit value direction of a random target token T, ``m`` the native write
norm at t) and the selectivity of 3.7 (``selectivity``: top-K overlap of the atom's logit shift at eps = 1, h = 0
with a matched-norm Gaussian rank-1 and a rank-1 orthogonal to the atom's factors).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .firings import check_cell, scan_firings
from ..generation.directions import value_directions
from ..ops.precision import compute_dtype
from .logit_shift import (decay_gain, head_output_matrix, key_alignment, out_path_logits, paper_prediction,
                          top_k_overlap)
from .passages import as_passages
from .state_perturbation import StatePerturbations

EPS_GRIDS = {"appendix": (0.1, 0.3, 1.0, 3.0), "preregistered": (0.25, 0.5, 0.75, 1.0)}
DEFAULT_HORIZONS = (0, 1, 4, 16)
SELECTIVITY_K = (1, 5, 10, 20, 30, 32)
CONTROLS = ("random", "orthogonal")


@dataclass
class AuditResult:
    """What ``logit_shift_audit`` returns (each table can be saved as it is)."""

    records: pd.DataFrame  # one row per prompt x atom x eps x horizon x eval token
    sign_trials: pd.DataFrame  # one row per (prompt, atom, target token) trial of 6.2
    selectivity: pd.DataFrame  # one row per (prompt, atom, control, K)
    atoms: list[int]
    settings: dict = field(default_factory=dict)


@torch.no_grad()
def logit_shift_audit(
    model,
    sae,
    layer: int,
    head: int,
    prompts,
    *,
    n_atoms: int = 50,
    atoms: list[int] | None = None,
    eps: tuple[float, ...] = EPS_GRIDS["appendix"],
    horizons: tuple[int, ...] = DEFAULT_HORIZONS,
    n_eval_tokens: int = 64,
    first_order: bool = True,
    n_sign_trials: int = 2000,
    selectivity: bool = True,
    seed: int = 2026,
    batch_size: int = 256,
    passage_batch_size: int = 8,
    progress: bool = True,
    ignore_sae_metadata: bool = False,
) -> AuditResult:
    """Run the audit on ``prompts`` (a token tensor ``[n, n_pos]`` or anything ``evaluation.passages`` takes; the
    logits are read at each prompt's last position). See the module docstring for the protocol.
    ``ignore_sae_metadata=True`` accepts an SAE of another model, layer or head of the same shape (``check_cell``)."""
    check_cell(model, sae, layer, head, ignore_sae_metadata=ignore_sae_metadata)
    tokens = as_passages(model, prompts)  # [n_prompts, n_pos]
    n_prompts, n_pos = tokens.shape
    eps, horizons = _checked_grid(eps, horizons, n_pos)
    for name, value in (("batch_size", batch_size), ("passage_batch_size", passage_batch_size),
                        ("n_atoms", n_atoms), ("n_eval_tokens", n_eval_tokens)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(n_sign_trials, numbers.Integral) or n_sign_trials < 0:
        raise ValueError(f"n_sign_trials must be a non-negative integer, got {n_sign_trials!r}")
    d_vocab = model.cfg.d_vocab
    n_eval_tokens = min(n_eval_tokens, d_vocab)

    scan = scan_firings(model, sae, layer, head, tokens, passage_batch_size, progress,
                        ignore_sae_metadata=ignore_sae_metadata)
    atoms = _chosen_atoms(scan.alive, atoms, n_atoms, seed, sae.cfg.d_sae)
    device = model.cfg.device
    dtype = compute_dtype(next(model.parameters()))
    keys = sae.W_dec_key.detach()[atoms].to(device, dtype)  # [A, R, d_k]
    values = sae.W_dec_value.detach()[atoms].to(device, dtype)  # [A, R, d_v]
    matrices = torch.einsum("ark,arv->akv", keys, values)  # [A, d_k, d_v]
    w_o = head_output_matrix(model.blocks[layer].mixer, head).detach().to(dtype)  # [d_model, d_v]
    w_u = model.W_U.detach().to(dtype)  # [d_model, d_vocab]
    out_path = out_path_logits(w_o, w_u, values)  # [A, R, d_vocab]
    eval_tokens = out_path.norm(dim=1).topk(n_eval_tokens, dim=-1).indices  # [A, J]
    out_at_eval = out_path.gather(2, eval_tokens[:, None, :].expand(-1, out_path.shape[1], -1))  # [A, R, J]

    engine = StatePerturbations(model, layer, head, tokens, sorted(set(horizons) | {0}), passage_batch_size)
    t = n_pos - 1
    query_t = engine.inputs["query"][:, t]  # [N, d_k]
    n_a, n_e, n_h, n_j = len(atoms), len(eps), len(horizons), n_eval_tokens
    eps_t = torch.tensor(eps, dtype=dtype, device=device)
    measured = np.zeros((n_prompts, n_h, n_a, n_e, n_j), dtype=np.float32)
    first = np.full((n_prompts, n_h, n_a, n_e, n_j), np.nan, dtype=np.float32)
    predicted = np.zeros_like(measured)
    gain_out = np.zeros((n_prompts, n_h), dtype=np.float32)
    alignment_out = np.zeros((n_prompts, n_h, n_a), dtype=np.float32)
    generator = torch.Generator().manual_seed(seed)
    sign_rows: list[dict] = []
    selectivity_rows: list[dict] = []
    sign_plan = _sign_plan(n_prompts, n_a, n_sign_trials, d_vocab, seed)

    rows_per_prompt = n_h * (1 + n_a * n_e + (n_a if first_order else 0)) + (2 * n_a if selectivity else 0)
    bar = tqdm(total=n_prompts * rows_per_prompt, desc="closed-form audit", unit="row", disable=not progress)
    for group in engine.groups():
        local = torch.arange(len(group.prompts))
        prompt_index = torch.tensor(group.prompts)
        zeros = torch.zeros(len(local), *matrices.shape[1:], dtype=dtype, device=device)
        natives = {}  # horizon -> unperturbed logits [P, d_vocab] of the group's prompts, through the row path
        for hi, h in enumerate(horizons):
            t0 = t - h
            log_decay = engine.inputs["log_decay"][prompt_index, t0 + 1 : t + 1]  # [P, h] or [P, h, d_k]
            per_channel = log_decay.dim() == 3
            gain = decay_gain(log_decay, channel_axis=per_channel)  # [P] or [P, d_k]
            # <G p_r, q_t> for every prompt, atom, rank: [P, A, R]
            g = gain[:, None, None, :] if per_channel else gain[:, None, None]
            align = key_alignment(keys[None], query_t[prompt_index][:, None, None, :], g)
            prediction = paper_prediction(eps_t[None, None, None, :, None], align[..., None, None],
                                          out_at_eval[None, :, :, None, :]).sum(2)  # [P, A, E, J], summed over rank
            predicted[group.prompts, hi] = prediction.cpu().numpy()
            gain_out[group.prompts, hi] = (gain.mean(-1) if per_channel else gain).cpu().numpy()
            alignment_out[group.prompts, hi] = align.sum(-1).cpu().numpy()

            native = natives[h] = engine.logits(group, h, local, zeros)
            native_at = native[:, eval_tokens.flatten()].reshape(len(local), n_a, n_j)  # [P, A, J]
            bar.update(len(local))
            # perturbed rows: (prompt, atom, eps), in batches
            grid = torch.cartesian_prod(local, torch.arange(n_a), torch.arange(n_e))  # [P*A*E, 3]
            for chunk in grid.split(batch_size):
                p, a, e = chunk.T
                logits = engine.logits(group, h, p, eps_t[e, None, None] * matrices[a])
                shift = logits.gather(1, eval_tokens[a]) - native_at[p, a]
                measured[prompt_index[p].numpy(), hi, a.numpy(), e.numpy()] = shift.cpu().numpy()
                bar.update(len(chunk))
            if first_order:
                pairs = torch.cartesian_prod(local, torch.arange(n_a))
                for chunk in pairs.split(batch_size):
                    p, a = chunk.T
                    _, tangent = engine.first_order(group, h, p, matrices[a])
                    slope = tangent.gather(1, eval_tokens[a]).detach()  # [rows, J]
                    first[prompt_index[p].numpy(), hi, a.numpy()] = (
                        eps_t[None, :, None] * slope[:, None, :]).cpu().numpy()
                    bar.update(len(chunk))
        native0 = natives[0] if 0 in natives else engine.logits(group, 0, local, zeros)  # h = 0: 6.2 and 3.7
        if selectivity:
            selectivity_rows += _selectivity_rows(engine, group, native0, matrices, keys, values, atoms, generator,
                                                  batch_size)
            bar.update(2 * n_a * len(local))
        sign_rows += _sign_rows(engine, group, native0, sign_plan, keys, atoms, w_o, w_u, query_t)
    bar.close()

    records = _records_frame(measured, predicted, first if first_order else None, gain_out, alignment_out,
                             out_at_eval.sum(1), eval_tokens, atoms, eps, horizons, layer, head)
    settings = dict(layer=layer, head=head, n_prompts=n_prompts, prompt_len=n_pos, atoms=atoms, eps=list(eps),
                    horizons=list(horizons), n_eval_tokens=n_eval_tokens, first_order=first_order, seed=seed,
                    n_alive=int(scan.alive.sum()))
    return AuditResult(records, pd.DataFrame(sign_rows, columns=SIGN_COLUMNS),
                       pd.DataFrame(selectivity_rows, columns=SELECTIVITY_COLUMNS), atoms, settings)


# ---- checks and choices ----------------------------------------------------------------------------------------------

def _checked_grid(eps, horizons, n_pos: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
    eps = tuple(float(e) for e in eps)
    if not eps:
        raise ValueError("eps is empty: give at least one perturbation size")
    bad = [e for e in eps if not (math.isfinite(e) and e > 0)]
    if bad:
        raise ValueError(f"every eps must be finite and > 0; got {bad}")
    horizons = tuple(horizons)
    if not horizons:
        raise ValueError("horizons is empty: give at least one horizon h >= 0")
    for h in horizons:
        if not isinstance(h, numbers.Integral) or h < 0:
            raise ValueError(f"horizons must be integers >= 0, got {h!r}")
        if h > n_pos - 1:
            raise ValueError(f"horizon {h} is past the prompt: with prompts of {n_pos} tokens, t0 = t - h needs "
                             f"h <= {n_pos - 1}")
    if len(set(horizons)) != len(horizons) or len(set(eps)) != len(eps):
        raise ValueError(f"eps and horizons must not repeat; got eps {list(eps)}, horizons {list(horizons)}")
    return eps, tuple(int(h) for h in horizons)


def _chosen_atoms(alive: torch.Tensor, atoms, n_atoms: int, seed: int, d_sae: int) -> list[int]:
    alive_ids = torch.nonzero(alive).flatten().tolist()
    if atoms is not None:
        atoms = [int(a) for a in atoms]
        if not atoms:
            raise ValueError("atoms is empty")
        out = [a for a in atoms if not 0 <= a < d_sae]
        if out:
            raise ValueError(f"atoms {out} are out of range; this SAE has atoms 0..{d_sae - 1}")
        dead = [a for a in atoms if not bool(alive[a])]
        if dead:
            raise ValueError(f"atoms {dead} are dead on these prompts (they never fire); alive atoms: "
                             f"{len(alive_ids)}, e.g. {alive_ids[:10]}")
        return atoms
    if not alive_ids:
        raise ValueError("no atom of this SAE fires on these prompts: nothing to audit")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(alive_ids), min(n_atoms, len(alive_ids)), replace=False)
    return sorted(alive_ids[i] for i in pick)


# ---- 6.2: single-position sign prediction -----------------------------------------------------------------------------

SIGN_COLUMNS = ["prompt", "atom", "target", "magnitude", "key_alignment", "token_gain", "predicted", "measured"]


def _sign_plan(n_prompts: int, n_atoms: int, n_trials: int, d_vocab: int, seed: int) -> dict[int, list]:
    """prompt -> [(atom index, target token)], ``n_trials`` trials over prompts x atoms in order (cycling), each with
    a uniformly drawn target token."""
    rng = np.random.default_rng(seed + 1)
    plan: dict[int, list] = {}
    for trial in range(n_trials):
        pair = trial % (n_prompts * n_atoms)
        plan.setdefault(pair // n_atoms, []).append((pair % n_atoms, int(rng.integers(d_vocab))))
    return plan


def _sign_rows(engine, group, native, plan, keys, atoms, w_o, w_u, query_t) -> list[dict]:
    """6.2 at h = 0: write ``m u v_T*^T`` (u: the atom's unit key factor, v_T*: token T's unit value direction, m: the
    native write norm at t) and compare the measured shift of T's logit with ``m <u, q_t> ||W_O^T W_U[:, T]||``."""
    trials = [(i, a, T) for i, prompt in enumerate(group.prompts) for a, T in plan.get(prompt, [])]
    if not trials:
        return []
    local = torch.tensor([i for i, _, _ in trials])
    atom_index = torch.tensor([a for _, a, _ in trials])
    target = torch.tensor([T for _, _, T in trials])
    prompts = torch.tensor(group.prompts)[local]
    u = keys[atom_index, 0]
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # [n, d_k]
    direction, token_gain = value_directions(w_o, w_u[:, target.to(w_u.device)])  # v_T* [n, d_v], ||W_O^T W_U[:, T]||
    magnitude = engine.inputs["write_norm"][prompts, engine.t]
    alignment = (u * query_t[prompts]).sum(-1)
    matrices = magnitude[:, None, None] * u[:, :, None] * direction[:, None, :]
    native = native[local]  # the group's unperturbed logits at h = 0, per trial
    edited = engine.logits(group, 0, local, matrices)
    index = target.to(native.device)[:, None]
    measured = (edited.gather(1, index) - native.gather(1, index))[:, 0]
    predicted = magnitude * alignment * token_gain
    return [dict(prompt=int(p), atom=atoms[int(a)], target=int(T), magnitude=float(m), key_alignment=float(k),
                 token_gain=float(g), predicted=float(pr), measured=float(me))
            for p, a, T, m, k, g, pr, me in zip(prompts, atom_index, target, magnitude, alignment, token_gain,
                                                 predicted, measured)]


# ---- 3.7: selectivity --------------------------------------------------------------------------------------------------

SELECTIVITY_COLUMNS = ["prompt", "atom", "control", "k", "overlap", "selectivity"]


def _selectivity_rows(engine, group, native, matrices, keys, values, atoms, generator, batch_size) -> list[dict]:
    """Top-K overlap of the atom's logit shift (eps = 1, h = 0) with a matched-norm Gaussian rank-1 and a rank-1
    orthogonal to the atom's factors, both at the atom's Frobenius norm."""
    n_a = len(atoms)
    local = torch.arange(len(group.prompts))
    dtype, device = matrices.dtype, matrices.device
    norms = matrices.flatten(1).norm(dim=-1)  # [A]
    controls = {}
    for name in CONTROLS:
        u = torch.randn(len(local), n_a, matrices.shape[1], generator=generator).to(device, dtype)
        w = torch.randn(len(local), n_a, matrices.shape[2], generator=generator).to(device, dtype)
        if name == "orthogonal":  # project out every factor of the atom (rank R: its span)
            u = u - _projection(u, keys)
            w = w - _projection(w, values)
        outer = u[..., :, None] * w[..., None, :]
        controls[name] = outer * (norms[None] / outer.flatten(2).norm(dim=-1))[..., None, None]  # [P, A, k, v]
    k_max = min(max(SELECTIVITY_K), engine.model.cfg.d_vocab)
    rows = []
    pairs = torch.cartesian_prod(local, torch.arange(n_a))
    for chunk in pairs.split(batch_size):
        p, a = chunk.T
        atom_shift = engine.logits(group, 0, p, matrices[a]) - native[p]
        for name in CONTROLS:
            control_shift = engine.logits(group, 0, p, controls[name][p, a]) - native[p]
            for k in SELECTIVITY_K:
                if k > k_max:
                    continue
                overlap = top_k_overlap(atom_shift, control_shift, k)
                rows += [dict(prompt=group.prompts[int(pi)], atom=atoms[int(ai)], control=name, k=k,
                              overlap=float(o), selectivity=1.0 - float(o)) for pi, ai, o in zip(p, a, overlap)]
    return rows


def _projection(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """The part of ``x`` [P, A, d] in the span of each atom's factors ``factors`` [A, R, d]."""
    basis, _ = torch.linalg.qr(factors.transpose(1, 2))  # [A, d, R], orthonormal columns
    coordinates = torch.einsum("adr,pad->par", basis, x)
    return torch.einsum("adr,par->pad", basis, coordinates)


# ---- the records table ---------------------------------------------------------------------------------------------

RECORD_COLUMNS = ["prompt", "layer", "head", "atom", "eps", "horizon", "eval_rank", "token", "measured", "predicted",
                  "first_order", "gain", "key_alignment", "out_path"]


def _records_frame(measured, predicted, first, gain, alignment, out_path, eval_tokens, atoms, eps, horizons,
                   layer, head) -> pd.DataFrame:
    """Flatten the [prompt, horizon, atom, eps, eval rank] grids into one row per cell, compactly typed."""
    n_p, n_h, n_a, n_e, n_j = measured.shape
    grid = np.indices((n_p, n_h, n_a, n_e, n_j)).reshape(5, -1)
    p, hi, a, e, j = grid
    atoms_arr = np.asarray(atoms, dtype=np.int32)
    tokens = eval_tokens.cpu().numpy().astype(np.int32)
    out = out_path.detach().cpu().numpy()
    return pd.DataFrame({
        "prompt": p.astype(np.int32),
        "layer": np.full(p.shape, layer, dtype=np.int16),
        "head": np.full(p.shape, head, dtype=np.int16),
        "atom": atoms_arr[a],
        "eps": np.asarray(eps, dtype=np.float32)[e],
        "horizon": np.asarray(horizons, dtype=np.int16)[hi],
        "eval_rank": (j + 1).astype(np.int16),
        "token": tokens[a, j],
        "measured": measured.reshape(-1),
        "predicted": predicted.reshape(-1),
        "first_order": (first if first is not None else np.full_like(measured, np.nan)).reshape(-1),
        "gain": gain[p, hi],
        "key_alignment": alignment[p, hi, a],
        "out_path": out[a, j].astype(np.float32),
    })
