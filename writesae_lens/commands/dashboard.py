"""``writesae dashboard``: static, offline feature dashboards of a WriteSAE's atoms (issue #19).

Writes to --out: ``index.html``, ``atoms/atom_NNNNN.html`` (one page per atom), ``features.json`` (Neuronpedia's
feature fields plus the write-specific panels) and ``settings.json``. See docs/dashboards.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (
    cell_arguments,
    heldout_passages,
    ignore_metadata_argument,
    input_paths,
    int_at_least,
    load_model,
    load_sae,
    model_arguments,
    non_negative_int,
    output_arguments,
    positive_int,
)

NAME = "dashboard"
HELP = "static HTML feature dashboards (and Neuronpedia-style JSON) of a WriteSAE's atoms"
DESCRIPTION = ("Scan held-out passages with the SAE on one head's state and write one page per atom plus an index: "
               "the top-activating contexts with the atom's code on each token, the code's density and histogram, "
               "the tokens whose mean keys align with p and whose mean values align with q, the logit effect of "
               "writing the atom (the closed form's out-path <W_O[h] q, W_U[tok]>) and, with --partition / "
               "--records, its register / bundle class, median write cosine and substitution win rate. The pages "
               "work offline (no network fetch at view time).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    cell_arguments(parser)
    parser.add_argument("--sae", type=Path, required=True, help="folder of a saved WriteSAE (SAE.load_from_disk)")
    ignore_metadata_argument(parser)
    parser.add_argument("--atoms", type=positive_int, default=64,
                        help="pages for the first N atoms (by index) that fire in the scan (default: %(default)s)")
    parser.add_argument("--atom-ids", type=int, nargs="+", default=None,
                        help="pages for exactly these atoms instead (firing or not)")
    parser.add_argument("--partition", type=Path, default=None,
                        help="output folder of `writesae partition` for the same SAE (its atoms.csv)")
    parser.add_argument("--records", type=Path, default=None,
                        help="records (csv or parquet) of a substitution run of the same SAE")
    parser.add_argument("--passages", type=positive_int, default=48,
                        help="held-out passages scanned (default: %(default)s)")
    parser.add_argument("--passage-len", type=positive_int, default=128,
                        help="tokens per passage (default: %(default)s)")
    parser.add_argument("--contexts", type=positive_int, default=10,
                        help="top contexts per atom (default: %(default)s)")
    parser.add_argument("--window", type=non_negative_int, nargs=2, default=[12, 4], metavar=("LEFT", "RIGHT"),
                        help="tokens shown before and after each top firing (default: 12 4)")
    parser.add_argument("--tokens", type=positive_int, default=10,
                        help="tokens per aligned-token and logit list (default: %(default)s)")
    parser.add_argument("--min-token-count", type=int_at_least(1), default=3,
                        help="occurrences a token needs in the scan to enter the key / value lists "
                        "(default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="passages per forward pass (default: %(default)s)")
    output_arguments(parser)


def run(args) -> int:
    import pandas as pd

    from ..dashboard import build_dashboard_data, write_dashboard
    from ..evaluation.records import load_records
    from ..outputs import check_output_folder, staged_output

    check_output_folder(args.out, args.overwrite)
    partition = None
    if args.partition is not None:
        table = args.partition / "atoms.csv" if args.partition.is_dir() else args.partition
        if not table.is_file():
            raise FileNotFoundError(f"--partition {args.partition} holds no atoms.csv "
                                    "(an output of `writesae partition`)")
        partition = pd.read_csv(table)
    if args.records is not None and not args.records.is_file():
        raise FileNotFoundError(f"--records {args.records} does not exist")
    records = load_records(args.records) if args.records is not None else None
    model = load_model(args)
    sae = load_sae(args.sae, args.device)
    passages = heldout_passages(model, args, args.passages, args.passage_len)
    data = build_dashboard_data(model, sae, args.layer, args.head, passages, batch_size=args.batch_size,
                                ignore_sae_metadata=args.ignore_sae_metadata, atoms=args.atom_ids,
                                n_atoms=args.atoms, n_contexts=args.contexts, left=args.window[0],
                                right=args.window[1], n_tokens=args.tokens, min_token_count=args.min_token_count,
                                partition=partition, records=records)
    inputs = input_paths(args) + [p for p in (args.partition, args.records) if p is not None]
    with staged_output(args.out, args.overwrite, inputs=inputs) as out:
        write_dashboard(data, out)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "command"}
        (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str), encoding="utf-8")
    print(f"{len(data.atoms)} atom pages, the index and features.json in {args.out}/ (open {args.out / 'index.html'})")
    return 0
