"""``writesae partition``: the register / bundle partition of a WriteSAE's atoms (paper §5.1), optionally joined with
the records of a substitution run (App. F.2, Table 13, Fig. 14), and the passage bits/token of §3.7.

Writes to --out: ``firings.csv`` (the cosine of every firing with both write forms), ``atoms.csv`` (per atom: firings,
median cosines, class), ``mixtures.csv`` (1-3 Gaussians: BIC, weights, means, sds), ``thresholds.csv`` (classes per
tau), ``passage_bits.csv``, with ``--records`` also ``class_win_rates.csv``, ``cosine_bins.csv`` and
``failure_quartiles.csv``; ``summary.txt`` / ``summary.json`` and ``cosine_histogram.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import cell_arguments, heldout_passages, load_model, load_sae, model_arguments, output_arguments

NAME = "partition"
HELP = "register / bundle partition of a WriteSAE's atoms by their cosine with the native write"
DESCRIPTION = ("For every firing, the signed cosine of the atom with the native write (beta k v^T and the delta "
               "form); per atom the median; Gaussian mixtures (scikit-learn) with BIC and the bimodality coefficient; "
               "classes register (median >= tau) / bundle / null (dead) and the threshold table. With --records (a "
               "substitution run of the same SAE): win rates per class, Mann-Whitney, the cosine-bin table and the "
               "failure rate by effect-size quartile. Passage bits/token: delete or randomly replace the write at "
               "every register firing of a passage.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    cell_arguments(parser)
    parser.add_argument("--sae", type=Path, required=True, help="folder of a saved WriteSAE (SAE.load_from_disk)")
    parser.add_argument("--passages", type=int, default=200, help="held-out passages scanned (default: %(default)s)")
    parser.add_argument("--passage-len", type=int, default=512, help="tokens per passage (default: %(default)s)")
    parser.add_argument("--write-form", choices=["beta", "delta"], default="beta",
                        help="the write the classes use: beta k v^T (the paper's headline) or the delta form k delta^T")
    parser.add_argument("--tau", type=float, default=0.05, help="register threshold (default: %(default)s)")
    parser.add_argument("--n-init", type=int, default=10,
                        help="restarts of each Gaussian mixture (default: %(default)s)")
    parser.add_argument("--records", type=Path, default=None,
                        help="records (csv or parquet) of a substitution run of the same SAE, to join with the classes")
    parser.add_argument("--min-firings", type=int, default=5,
                        help="firings an atom needs to enter the per-atom tables (default: %(default)s)")
    parser.add_argument("--bits-passages", type=int, default=20,
                        help="passages of the bits/token comparison, 0 to skip (default: %(default)s, the paper's)")
    parser.add_argument("--batch-size", type=int, default=8, help="passages per forward pass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mixtures, the null sample, the random writes")
    output_arguments(parser)


def run(args) -> int:
    from ..evaluation.partition import partition_atoms
    from ..evaluation.records import load_records
    from ..outputs import check_output_folder, staged_output

    check_output_folder(args.out, args.overwrite)
    for name in ("passages", "passage_len", "n_init", "batch_size", "min_firings"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.bits_passages < 0:
        raise ValueError(f"--bits-passages must be >= 0, got {args.bits_passages}")
    if args.records is not None and not args.records.is_file():
        raise FileNotFoundError(f"--records {args.records} does not exist")
    records = load_records(args.records) if args.records is not None else None
    model = load_model(args)
    sae = load_sae(args.sae, args.device)
    passages = heldout_passages(model, args, args.passages, args.passage_len)
    result = partition_atoms(model, sae, args.layer, args.head, passages, write_form=args.write_form, tau=args.tau,
                             n_init=args.n_init, seed=args.seed, batch_size=args.batch_size)
    with staged_output(args.out, args.overwrite) as out:
        text = save_partition(result, out, model, sae, args, passages, records)
    print(text)
    print(f"\nrecords, summary and plots in {args.out}/")
    return 0


def save_partition(result, out: Path, model, sae, args, passages, records) -> str:
    """Write the partition's tables, the joins and the bits/token to ``out``; return the summary text."""
    from ..evaluation.dictionary_plots import plot_cosine_histogram
    from ..evaluation.partition import format_partition
    from ..evaluation.partition_records import class_win_rates, cosine_bin_table, failure_by_quartile
    from ..evaluation.passage_bits import passage_bits_per_token, summarize_bits

    result.firings.to_csv(out / "firings.csv", index=False)
    result.atoms.to_csv(out / "atoms.csv", index=False)
    result.mixtures.to_csv(out / "mixtures.csv", index=False)
    result.thresholds.to_csv(out / "thresholds.csv", index=False)
    plot_cosine_histogram(result.atoms, result.mixtures, out / "cosine_histogram.png", tau=args.tau,
                          title=f"Partition, layer {args.layer} head {args.head}")
    payload = {"partition": result.summary, "thresholds": result.thresholds.to_dict("records")}
    lines = [format_partition(result.summary, result.thresholds)]
    if records is not None:
        classes, test = class_win_rates(records, result.atoms, min_firings=args.min_firings)
        bins = cosine_bin_table(records, result.atoms, min_firings=args.min_firings)
        quartiles = failure_by_quartile(records)
        classes.to_csv(out / "class_win_rates.csv", index=False)
        bins.to_csv(out / "cosine_bins.csv", index=False)
        quartiles.to_csv(out / "failure_quartiles.csv", index=False)
        payload.update(class_win_rates=classes.to_dict("records"), mann_whitney=test,
                       cosine_bins=bins.astype({"bin": str}).to_dict("records"),
                       failure_quartiles=quartiles.astype({"quartile": str}).to_dict("records"))
        lines += ["", "Substitution records by class:", classes.to_string(index=False),
                  f"  Mann-Whitney U (per-atom win rates, register vs bundle, two-sided): U = {test['u']}, "
                  f"p = {test['p']:.3g} ({test['n_register']} vs {test['n_bundle']} atoms)",
                  "", "By the atom's median cosine:", bins.to_string(index=False),
                  "", "Failure rate by KL_delete quartile:", quartiles.to_string(index=False)]
    registers = result.atoms.loc[result.atoms["class"] == "register", "atom"].tolist()
    if args.bits_passages and registers:
        bits = passage_bits_per_token(model, sae, args.layer, args.head, passages[: args.bits_passages], registers,
                                      seed=args.seed)
        bits.to_csv(out / "passage_bits.csv", index=False)
        b = summarize_bits(bits)
        payload["passage_bits"] = b
        lines += ["", f"Passage bits/token over {b['passages']} passages ({b['edits']} register firings edited, "
                  f"native {b['bits_native']:.4f} bits/token): delete {b['delta_delete']:+.5f}, random rank-1 "
                  f"{b['delta_random']:+.5f} ({b['random_over_delete']:.3g}x; random worse in {b['random_worse']}/"
                  f"{b['passages']})"]
        if "floor" in b:
            lines.append(f"  numerical floor {b['floor']:.2g} bits/token (native rows of two computations); "
                         f"{b['below_floor']} passage(s) with edits at or below it")
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    settings = {k: str(v) for k, v in vars(args).items() if k != "command"}
    (out / "summary.json").write_text(json.dumps({"settings": settings, **payload}, indent=2, default=float),
                                      encoding="utf-8")
    return text
