"""``writesae closed-form``: the closed-form logit-shift audit (paper appendix A, 3.7, 6.2) of one head's WriteSAE.

Writes to --out: ``records.parquet`` (one row per prompt x atom x eps x horizon x eval token), ``cells.csv`` (R^2 of
each predictor per cell), ``sign_trials.csv`` (6.2), ``selectivity.csv`` (3.7), ``summary.txt`` / ``summary.json``
and three plots. The defaults are the paper's protocol: 50 atoms, eps {0.1, 0.3, 1, 3}, 500 prompts, 64 eval tokens,
horizons {0, 1, 4, 16}.
"""

from __future__ import annotations

import argparse
import json

from .common import (cell_arguments, heldout_passages, ignore_metadata_argument, input_paths, load_model, load_sae,
                     model_arguments, non_negative_int, output_arguments, positive_float, positive_int, sae_argument)

NAME = "closed-form"
HELP = "audit the paper's closed-form logit shift (and the exact first-order shift) against measured shifts"
DESCRIPTION = ("Perturb the head's state at t0 = t - h by eps * atom for alive atoms, read the logit shift at the "
               "prompt's last position t, and compare it with the paper's closed form eps * G * <p, q_t> * "
               "<W_O q, W_U[tok]> (parameter-free and with a fitted scale) and with the exact first-order shift "
               "(forward-mode JVP); also the sign checks and the top-K selectivity.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    cell_arguments(parser)
    sae_argument(parser)
    ignore_metadata_argument(parser)
    parser.add_argument("--prompts", type=positive_int, default=500, help="held-out prompts (default: %(default)s)")
    parser.add_argument("--prompt-len", type=positive_int, default=64,
                        help="tokens per prompt; t = the last (default: %(default)s)")
    parser.add_argument("--atoms", type=positive_int, default=50,
                        help="alive atoms drawn with --seed (default: %(default)s)")
    parser.add_argument("--atom-ids", type=non_negative_int, nargs="+", default=None, help="audit these atoms instead")
    parser.add_argument("--eps-grid", choices=["appendix", "preregistered"], default="appendix",
                        help="appendix A's {0.1, 0.3, 1, 3} or the pre-registered {0.25, 0.5, 0.75, 1}")
    parser.add_argument("--eps", type=positive_float, nargs="+", default=None,
                        help="explicit eps values (override the grid)")
    parser.add_argument("--horizons", type=non_negative_int, nargs="+", default=[0, 1, 4, 16],
                        help="h = t - t0 (default: 0 1 4 16)")
    parser.add_argument("--eval-tokens", type=positive_int, default=64, help="eval tokens per atom (default: %(default)s)")
    parser.add_argument("--no-first-order", action="store_true", help="skip the forward-mode JVP")
    parser.add_argument("--sign-trials", type=non_negative_int, default=2000, help="trials of the 6.2 sign prediction")
    parser.add_argument("--no-selectivity", action="store_true", help="skip the top-K selectivity of 3.7")
    parser.add_argument("--batch-size", type=positive_int, default=256,
                        help="perturbed rows per batch (default: %(default)s)")
    parser.add_argument("--passage-batch-size", type=positive_int, default=8, help="prompts per native pass")
    parser.add_argument("--seed", type=int, default=2026)
    output_arguments(parser)


def run(args) -> int:
    from ..evaluation.closed_form import EPS_GRIDS, logit_shift_audit
    from ..outputs import check_output_folder, staged_output

    check_output_folder(args.out, args.overwrite)
    model = load_model(args)
    sae = load_sae(args.sae, args.device)
    prompts = heldout_passages(model, args, args.prompts, args.prompt_len, whole_text=True)  # trains nothing on it
    result = logit_shift_audit(
        model, sae, args.layer, args.head, prompts, n_atoms=args.atoms, atoms=args.atom_ids,
        eps=tuple(args.eps) if args.eps else EPS_GRIDS[args.eps_grid], horizons=tuple(args.horizons),
        n_eval_tokens=args.eval_tokens, first_order=not args.no_first_order, n_sign_trials=args.sign_trials,
        selectivity=not args.no_selectivity, seed=args.seed, batch_size=args.batch_size,
        passage_batch_size=args.passage_batch_size, ignore_sae_metadata=args.ignore_sae_metadata,
    )
    with staged_output(args.out, args.overwrite, inputs=input_paths(args)) as out:
        text = save_audit(result, out, settings={k: str(v) for k, v in vars(args).items() if k != "command"})
    print(text)
    print(f"\nrecords, summary and plots in {args.out}/")
    return 0


def save_audit(result, folder, settings: dict | None = None) -> str:
    """Write an ``AuditResult``'s tables, summary and plots into ``folder``; return the summary text."""
    from ..evaluation.closed_form_plots import plot_measured_vs_predicted, plot_r2_by_horizon, plot_r2_by_rank
    from ..evaluation.closed_form_summary import format_audit_summary, summarize_audit

    summary = summarize_audit(result.records, result.sign_trials, result.selectivity)
    text = format_audit_summary(summary, title=f"Closed-form logit shift, layer {result.settings['layer']} head "
                                f"{result.settings['head']}: {len(result.atoms)} atoms, "
                                f"{result.settings['n_prompts']} prompts")
    result.records.to_parquet(folder / "records.parquet", index=False)
    summary.cells.to_csv(folder / "cells.csv", index=False)
    result.sign_trials.to_csv(folder / "sign_trials.csv", index=False)
    result.selectivity.to_csv(folder / "selectivity.csv", index=False)
    (folder / "summary.txt").write_text(text + "\n", encoding="utf-8")
    payload = dict(settings={**result.settings, **(settings or {})}, headline=summary.headline.to_dict("records"),
                   sign_check=summary.sign_check.to_dict("records"), sign_prediction=summary.sign_prediction,
                   selectivity=summary.selectivity.to_dict("records"))
    (folder / "summary.json").write_text(json.dumps(payload, indent=2, default=float), encoding="utf-8")
    plot_measured_vs_predicted(result.records, folder / "measured_vs_predicted.png")
    plot_r2_by_rank(summary, folder / "r2_by_rank.png")
    plot_r2_by_horizon(summary, folder / "r2_by_horizon.png")
    return text
