"""``writesae inspect``: the memory report of a model (``writesae_lens.evaluation.memory``).

    writesae inspect --model qwen35-tiny --out DIR [--passages 8 --passage-len 256 --max-lag 128]

Writes ``memory.csv`` (one row per head), ``curves.csv`` (median contribution of a write per lag), ``memory.png``,
``summary.txt`` (the table and the suggested demo cell with its reason) and ``settings.json`` to --out.
"""

from __future__ import annotations

import argparse

from .common import heldout_passages, input_paths, load_model, model_arguments, non_negative_int, output_arguments, \
    positive_float, positive_int

NAME = "inspect"
HELP = ("memory report: per head, the decay, the share of the state that is the current write, how long a write "
        "lasts, and how much the state moves the logits")
DESCRIPTION = ("Per head of every recurrent layer: quantiles of the per-token decay, the median share of the state "
               "that is the current write, the memory length (first lag at which a write, propagated alone through the "
               "head's own transitions, keeps less than --threshold of its norm; median over source positions) and "
               "the mean KL of the next-token distribution when the head's state is zeroed or cut to the current write "
               "at every read. Measured on held-out passages (the held-out fifth of --text, or the shipped text).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    parser.add_argument("--layers", type=non_negative_int, nargs="+", default=None,
                        help="recurrent layers to report (default: all)")
    parser.add_argument("--passages", type=positive_int, default=8, help="held-out passages (default: %(default)s)")
    parser.add_argument("--passage-len", type=positive_int, default=256,
                        help="tokens per passage (default: %(default)s)")
    parser.add_argument("--max-lag", type=positive_int, default=128, help="longest lag followed (default: %(default)s)")
    parser.add_argument("--sources", type=positive_int, default=4,
                        help="source positions per passage for the memory length (default: %(default)s)")
    parser.add_argument("--first-position", type=non_negative_int, default=32,
                        help="positions before this one are left out of the statistics (default: %(default)s)")
    parser.add_argument("--threshold", type=positive_float, default=0.1,
                        help="contribution that ends a write's memory, in (0, 1) (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="rows per batch (default: %(default)s)")
    output_arguments(parser)


def run(args) -> int:
    from .. import pipeline
    from ..evaluation.memory import MemorySettings, choose_demo_cell, format_memory_report, memory_report
    from ..evaluation.memory_plots import plot_memory_report
    from ..outputs import check_output_folder, staged_output

    check_output_folder(args.out, args.overwrite)
    settings = MemorySettings(first_position=args.first_position, max_lag=args.max_lag,
                              sources_per_passage=args.sources, threshold=args.threshold, batch_size=args.batch_size)
    settings.check(args.passage_len)
    model = load_model(args)
    passages = heldout_passages(model, args, args.passages, args.passage_len)
    report = memory_report(model, passages, settings, layers=args.layers, progress=True)
    layer, head, reason = choose_demo_cell(report=report)
    text = format_memory_report(report) + f"\n\nsuggested cell: layer {layer}, head {head}\n  {reason}"
    with staged_output(args.out, args.overwrite, inputs=input_paths(args)) as out:
        report.table.to_csv(out / "memory.csv", index=False)
        report.curves.to_csv(out / "curves.csv", index=False)
        plot_memory_report(report, out / "memory.png", title=f"memory report: {args.model}")
        (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
        pipeline.save_settings(out, **{k: v for k, v in vars(args).items() if k != "command"},
                               measured_passages=int(passages.shape[0]))
    print(text)
    print(f"\ntable, curves and plot in {args.out}/")
    return 0
