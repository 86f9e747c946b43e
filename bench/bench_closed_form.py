"""Perturbations per second of the closed-form audit against the straightforward protocol, same model, same
perturbations; and the wall time of the whole audit at the paper's size.

    python bench/bench_closed_form.py                    # shipped qwen35-tiny, 500 prompts x 50 atoms x 4 eps, h = 4
    python bench/bench_closed_form.py --prompts 50       # a tenth of the paper's size
    python bench/bench_closed_form.py --full             # also the whole audit (first order, selectivity, sign trials)

The straightforward protocol (what a re-implementation without snapshots does) is implemented here: for each
perturbation, run the prefix 0..t0-1 with a cache at batch 1, copy the cache, and run t0..t with ``eps * A_i`` added
to the state at t0 (``interventions.add_to_state``, write timing). Its rate is measured on ``--baseline`` perturbations
of the same grid; both must give the same shifts (the largest difference is printed). Goals (issue #11): >= 20x
perturbations/s on a 2-core CPU, the whole paper-size audit under 10 minutes.

The SAE is trained here with the demo's settings (layer 1, head 0, d_sae 256, k 16; about 20 s), unless --sae names a
saved one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from writesae_lens import interventions as iv  # noqa: E402
from writesae_lens import pipeline  # noqa: E402
from writesae_lens.evaluation.closed_form import EPS_GRIDS, logit_shift_audit  # noqa: E402
from writesae_lens.models import load_hooked_model  # noqa: E402


def demo_sae(model, folder: Path):
    from writesae_lens.cli import DEMO

    CELL = (1, 0)  # the cell the figures in the docs were measured on (the demo's before it chose its cell by memory)

    train_docs, _ = pipeline.split_documents(pipeline.load_texts(None))
    settings = pipeline.TrainSettings(layer=CELL[0], head=CELL[1], d_sae=DEMO["d_sae"], k=DEMO["k"],
                                      context_size=DEMO["context_size"], training_tokens=DEMO["training_tokens"],
                                      batch_tokens=DEMO["batch_tokens"], lr=DEMO["lr"],
                                      warmup_steps=DEMO["warmup_steps"])
    return pipeline.train_state_sae(model, train_docs, settings, folder)


def straightforward(model, layer, head, tokens, perturbations) -> tuple[float, list[np.ndarray]]:
    """Seconds per perturbation and the logit shifts of ``perturbations`` [(prompt, t0, matrix, token ids)]."""
    shifts = []
    start = time.perf_counter()
    with torch.no_grad():
        for prompt, t0, matrix, token_ids in perturbations:
            row = tokens[[prompt]]
            cache = model.empty_cache()
            if t0 > 0:
                model(row[:, :t0], cache=cache)
            native = model(row[:, t0:], cache=cache.copy())[0, -1]
            edited = model.run_with_hooks(row[:, t0:], cache=cache.copy(),
                                          fwd_hooks=iv.add_to_state(layer, [(0, 0, head)], matrix, timing="write"))
            shifts.append((edited[0, -1] - native)[token_ids].numpy())
    return (time.perf_counter() - start) / len(perturbations), shifts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--atoms", type=int, default=50)
    parser.add_argument("--horizon", type=int, default=4)
    parser.add_argument("--baseline", type=int, default=40, help="perturbations timed with the straightforward protocol")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sae", type=Path, default=None)
    parser.add_argument("--full", action="store_true", help="also time the whole audit (first order, selectivity, 6.2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_hooked_model("qwen35-tiny")
    if args.sae is None:
        sae = demo_sae(model, Path(tempfile.mkdtemp(prefix="bench-closed-form-")) / "sae")
    else:
        from writesae_lens.commands.common import load_sae

        sae = load_sae(args.sae, "cpu")
    layer, head = 1, 0
    # every shipped document (the held-out fifth alone has fewer than 500 prompts of 64 tokens; speed is what counts)
    tokens = pipeline.token_passages(model, pipeline.load_texts(None), args.prompts, args.prompt_len)
    eps = EPS_GRIDS["appendix"]
    print(f"qwen35-tiny L{layer} H{head}: {tokens.shape[0]} prompts x {args.prompt_len} tokens, {args.atoms} atoms, "
          f"eps {list(eps)}, horizon {args.horizon}, {args.threads} threads")

    start = time.perf_counter()
    result = logit_shift_audit(model, sae, layer, head, tokens, n_atoms=args.atoms, eps=eps, horizons=(args.horizon,),
                               first_order=False, selectivity=False, n_sign_trials=0, progress=False)
    audit_time = time.perf_counter() - start
    n_perturbations = tokens.shape[0] * len(result.atoms) * len(eps)
    rate = n_perturbations / audit_time
    print(f"audit (measured shifts only, incl. scan and native passes): {n_perturbations} perturbations in "
          f"{audit_time:.1f} s = {rate:.0f} /s")

    records = result.records
    atoms = iv.atom_matrices(sae, torch.arange(sae.cfg.d_sae), sae.cfg.d_sae)
    rng = np.random.default_rng(0)
    picks = rng.choice(n_perturbations, min(args.baseline, n_perturbations), replace=False)
    grid = [(p, a, e) for p in range(tokens.shape[0]) for a in result.atoms for e in eps]
    t0 = args.prompt_len - 1 - args.horizon
    plan, expected = [], []
    for i in picks:
        p, a, e = grid[i]
        rows = records[(records.prompt == p) & (records.atom == a) & (np.isclose(records.eps, e))]
        rows = rows.sort_values("eval_rank")
        plan.append((p, t0, e * atoms[a], torch.tensor(rows.token.to_numpy(), dtype=torch.long)))
        expected.append(rows.measured.to_numpy())
    seconds, shifts = straightforward(model, layer, head, tokens, plan)
    worst = max(float(np.abs(s - x).max()) for s, x in zip(shifts, expected))
    print(f"straightforward protocol: {1 / seconds:.1f} perturbations/s ({len(plan)} timed); largest shift "
          f"difference {worst:.2e}")
    print(f"ratio: {rate * seconds:.1f}x (goal >= 20x)")

    if args.full:
        start = time.perf_counter()
        full = logit_shift_audit(model, sae, layer, head, tokens, n_atoms=args.atoms, eps=eps,
                                 horizons=(args.horizon,), progress=False)
        elapsed = time.perf_counter() - start
        print(f"whole audit (measured, first order, selectivity, {len(full.sign_trials)} sign trials): "
              f"{elapsed:.0f} s = {elapsed / 60:.1f} min (goal < 10 min)")


if __name__ == "__main__":
    main()
