"""``writesae install``: the three-position install (paper section 6.3) on held-out prompts.

Writes to --out: ``records.csv`` (one row per prompt x window x target x m), ``summary.csv``, ``summary.txt`` /
``summary.json``, ``inclusion.png`` and ``settings.json``. The defaults are the paper's protocol (30 prompts, 5 windows
of 3 positions, 2 targets per class, m in {1.5, 3, 6}, 20 greedy tokens, rank windows for a 248k vocabulary); smaller
vocabularies need smaller rank windows (--mid-rank, --rare-rank, --out-of-context-rank).
"""

from __future__ import annotations

import argparse
import json

from .common import cell_arguments, heldout_passages, load_model, model_arguments, output_arguments

NAME = "install"
HELP = "write a target token's direction into one head's cache at three positions and count it in the continuation"
DESCRIPTION = ("For each held-out prompt, draw target tokens per class by their rank at the first generated step "
               "(mid-rank, rare, frequent and semantic out-of-context), add m |beta k v^T| (k/|k|) v_T*^T to the "
               "head's state at three consecutive prompt positions (v_T* = W_O[h]^T W_U[T], normalised) and decode "
               "greedily; compare target inclusion with the native continuation and a matched-norm random direction.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    cell_arguments(parser)
    parser.add_argument("--prompts", type=int, default=30, help="held-out prompts (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1.5, 3.0, 6.0],
                        help="m, times the native write's norm (default: 1.5 3 6)")
    parser.add_argument("--windows", type=int, default=5, help="windows per prompt (default: %(default)s)")
    parser.add_argument("--window", type=int, default=3, help="consecutive positions per window (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=20, help="greedy tokens generated (default: %(default)s)")
    parser.add_argument("--targets-per-class", type=int, default=2, help="(default: %(default)s)")
    parser.add_argument("--mid-rank", type=int, nargs=2, default=[100, 1000], metavar=("LOW", "HIGH"),
                        help="rank window of the mid-rank class (default: 100 1000)")
    parser.add_argument("--rare-rank", type=int, default=10_000,
                        help="lowest rank of the rare class (default: %(default)s)")
    parser.add_argument("--out-of-context-rank", type=int, default=17_000,
                        help="lowest rank of the frequent and semantic classes (default: %(default)s)")
    parser.add_argument("--no-random-control", action="store_true", help="skip the matched-norm random direction")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per batched decode (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=2026)
    output_arguments(parser)


def run(args) -> int:
    from .. import pipeline
    from ..generation.install import (InstallSettings, format_install_summary, install_trials, plot_inclusion,
                                      summarize_install)
    from ..generation.targets import frequent_tokens, paper_target_classes, word_tokens
    from ..outputs import check_output_folder, staged_output

    check_output_folder(args.out, args.overwrite)
    for name in ("prompts", "prompt_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model = load_model(args)
    if model.tokenizer is None:
        raise ValueError("the install's frequent and semantic classes need the model's tokenizer")
    prompts = list(heldout_passages(model, args, args.prompts, args.prompt_len).cpu())
    train_docs, _ = pipeline.split_documents(pipeline.load_texts(args.text))
    classes = paper_target_classes(frequent_tokens(model, train_docs[:500]), word_tokens(model),
                                   mid=tuple(args.mid_rank), rare=args.rare_rank,
                                   out_of_context=args.out_of_context_rank)
    settings = InstallSettings(multipliers=tuple(map(float, args.multipliers)), n_windows=args.windows,
                               window=args.window, max_new_tokens=args.new_tokens,
                               targets_per_class=args.targets_per_class, seed=args.seed,
                               random_control=not args.no_random_control)
    records = install_trials(model, args.layer, args.head, prompts, classes, settings, batch_size=args.batch_size,
                             progress=True)
    summary = summarize_install(records)
    text = (f"layer {args.layer} head {args.head}, {len(prompts)} prompts of {args.prompt_len} tokens, "
            f"{len(records)} trials\n" + format_install_summary(summary))
    with staged_output(args.out, args.overwrite, inputs=[args.text] if args.text else []) as out:
        records.to_csv(out / "records.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
        (out / "summary.json").write_text(json.dumps(summary.to_dict(orient="records"), indent=2), encoding="utf-8")
        plot_inclusion(summary, out / "inclusion.png")
        pipeline.save_settings(out, **{k: v for k, v in vars(args).items() if k != "command"})
    print(text)
    print(f"\nrecords, summary and plot in {args.out}/")
    return 0
