"""``writesae baselines``: a WriteSAE against its baselines (paper §8.1-8.3), in one table each.

Trains (or loads) SAELens' flat TopK SAE and a rank-2 WriteSAE on the same cell, runs the substitution test with the
WriteSAE, the flat SAE through top-1 SVDs (the reconstruction and the dominant-atom variants) and the rank-2 SAE on
the same passages, then splices each reconstruction (and the state's rank-r truncations) into the cache at a prefix
boundary and measures the suffix perplexity. Writes to --out: ``records_<substitute>.csv``,
``substitution_table.csv``, ``reconstruction.csv`` (per passage x condition), ``reconstruction_table.csv``,
``reconstruction.png``, ``summary.txt`` / ``summary.json``, and the trained SAEs (``flat_sae/``, ``rank2_sae/``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import cell_arguments, heldout_passages, load_model, load_sae, model_arguments, output_arguments

NAME = "baselines"
HELP = "compare a WriteSAE with the flat+SVD baseline, the rank-2 control and rank-r truncations"
DESCRIPTION = ("Substitution test of the WriteSAE, of SAELens' flat TopK SAE through the top-1 SVD at matched "
               "Frobenius norm (trained by SAELens' runner on the same hook and head unless --flat-sae is given) and "
               "of a rank-2 WriteSAE (trained unless --rank2-sae is given); then each SAE's reconstruction and the "
               "rank-r truncations of the state spliced into the cache at a prefix boundary, suffix perplexity "
               "against the native run.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model_arguments(parser)
    cell_arguments(parser)
    parser.add_argument("--sae", type=Path, required=True, help="folder of the saved WriteSAE under test")
    parser.add_argument("--flat-sae", type=Path, default=None, help="a saved flat SAELens SAE (default: train one)")
    parser.add_argument("--rank2-sae", type=Path, default=None, help="a saved rank-2 WriteSAE (default: train one)")
    train = parser.add_argument_group("training of the baselines (when not given)")
    train.add_argument("--d-sae", type=int, default=2048, help="dictionary size (default: %(default)s)")
    train.add_argument("--k", type=int, default=32, help="active latents per state (default: %(default)s)")
    train.add_argument("--context-size", type=int, default=1024, help="tokens per context (default: %(default)s)")
    train.add_argument("--training-tokens", type=int, default=2_000_000, help="tokens of states to train on")
    train.add_argument("--batch-tokens", type=int, default=4096, help="states per training batch")
    train.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default: %(default)s)")
    train.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps (default: %(default)s)")
    train.add_argument("--train-seed", type=int, default=42, help="training seed (default: %(default)s)")
    parser.add_argument("--passages", type=int, default=200, help="substitution passages (default: %(default)s)")
    parser.add_argument("--passage-len", type=int, default=512, help="tokens per passage (default: %(default)s)")
    parser.add_argument("--max-firings-per-feature", type=int, default=3,
                        help="cap per feature (default: %(default)s, the paper's flat+SVD replay)")
    parser.add_argument("--max-firings", type=int, default=None, help="cap on all firings (default: none)")
    parser.add_argument("--amplitude", choices=["natural", "native_norm"], default="natural",
                        help="the WriteSAE and rank-2 atoms' scale (the flat+SVD substitute is always at native norm)")
    parser.add_argument("--recon-passages", type=int, default=200, help="sequences of the cache splice (default: 200)")
    parser.add_argument("--recon-len", type=int, default=1024, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--prefix-len", type=int, default=None,
                        help="the splice position (default: half of --recon-len)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="rank-r truncations")
    parser.add_argument("--layer-saes", type=Path, default=None,
                        help="a folder with a saved WriteSAE per head of the layer (head_0/, head_1/, ...): the splice "
                        "is also run on every head at once (each with its own SAE; and the rank-r truncations)")
    parser.add_argument("--batch-size", type=int, default=192, help="edited rows per batch (default: %(default)s)")
    parser.add_argument("--passage-batch-size", type=int, default=8, help="passages per forward pass")
    parser.add_argument("--seed", type=int, default=2026)
    output_arguments(parser)


def run(args) -> int:
    from ..outputs import check_output_folder, staged_output

    check_output_folder(args.out, args.overwrite)
    for name in ("passages", "passage_len", "recon_passages", "recon_len", "batch_size", "passage_batch_size",
                 "max_firings_per_feature", "d_sae", "k"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(r < 1 for r in args.ranks):
        raise ValueError(f"--ranks must be positive, got {args.ranks}")
    for flag in ("flat_sae", "rank2_sae"):
        folder = getattr(args, flag)
        if folder is not None and not (folder / "cfg.json").exists():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {folder} is not a saved SAE folder (no cfg.json)")
    model = load_model(args)
    sae = load_sae(args.sae, args.device)
    layer_saes = _layer_saes(args.layer_saes, model.cfg.n_heads, args.device) if args.layer_saes else None
    with staged_output(args.out, args.overwrite) as out:
        flat, rank2 = _baseline_saes(model, args, out)
        text = _compare(model, args, out, {"writesae": sae, "flat": flat, "rank2": rank2}, layer_saes)
    print(text)
    print(f"\nrecords, tables, plots and the trained baselines in {args.out}/")
    return 0


def _baseline_saes(model, args, out: Path):
    from .. import pipeline

    settings = pipeline.TrainSettings(
        layer=args.layer, head=args.head, d_sae=args.d_sae, k=args.k, context_size=args.context_size,
        training_tokens=args.training_tokens, batch_tokens=args.batch_tokens, lr=args.lr,
        warmup_steps=args.warmup_steps, seed=args.train_seed)
    train_docs, _ = pipeline.split_documents(pipeline.load_texts(args.text))
    if args.flat_sae is not None:
        flat = load_sae(args.flat_sae, args.device)
    else:
        print("training SAELens' flat TopK SAE on the same hook and head")
        flat = pipeline.train_flat_sae(model, train_docs, settings, out / "flat_sae", device=args.device)
    if args.rank2_sae is not None:
        rank2 = load_sae(args.rank2_sae, args.device)
    else:
        print("training the rank-2 WriteSAE")
        settings.rank = 2
        rank2 = pipeline.train_state_sae(model, train_docs, settings, out / "rank2_sae", device=args.device)
    return flat, rank2


def _layer_saes(folder: Path, n_heads: int, device: str) -> dict:
    """``{head: sae}`` from ``folder/head_{h}`` for every head."""
    missing = [h for h in range(n_heads) if not (folder / f"head_{h}" / "cfg.json").exists()]
    if missing:
        raise FileNotFoundError(f"--layer-saes {folder} has no saved SAE for heads {missing} (expected "
                                f"{folder}/head_{{h}}/cfg.json for h = 0..{n_heads - 1})")
    return {h: load_sae(folder / f"head_{h}", device) for h in range(n_heads)}


def _compare(model, args, out: Path, saes: dict, layer_saes: dict | None = None) -> str:
    from ..evaluation.baselines import compare_substitution, flat_svd_test
    from ..evaluation.cache_reconstruction import reconstruction_sweep, reconstruction_table, standard_conditions
    from ..evaluation.dictionary_plots import plot_reconstruction
    from ..evaluation.records import save_records
    from ..evaluation.substitution import replacement_test

    passages = heldout_passages(model, args, args.passages, args.passage_len)
    options = dict(max_firings_per_feature=args.max_firings_per_feature, max_firings=args.max_firings, seed=args.seed,
                   batch_size=args.batch_size, passage_batch_size=args.passage_batch_size)
    cell = (model, saes["writesae"], args.layer, args.head, passages)
    records = {"writesae": replacement_test(*cell, amplitude=args.amplitude, **options)}
    for variant in ("reconstruction", "atom"):
        records[f"flat_svd_{variant}"] = flat_svd_test(model, saes["flat"], args.layer, args.head, passages,
                                                       variant=variant, **options)
    records["rank2"] = replacement_test(model, saes["rank2"], args.layer, args.head, passages,
                                        amplitude=args.amplitude, **options)
    for name, table in records.items():
        save_records(table, out / f"records_{name}.csv", overwrite=True)
    substitution = compare_substitution(records, reference="writesae")
    substitution.to_csv(out / "substitution_table.csv", index=False)

    sequences = heldout_passages(model, args, args.recon_passages, args.recon_len)
    prefix_len = sequences.shape[1] // 2 if args.prefix_len is None else args.prefix_len
    conditions = standard_conditions(model, [args.head], {name: {args.head: sae} for name, sae in saes.items()},
                                     ranks=args.ranks)
    if layer_saes is not None:  # every head of the layer at once, each with its own SAE
        every_head = standard_conditions(model, sorted(layer_saes), {"writesae": layer_saes}, ranks=args.ranks)
        conditions.update({f"{name}_all_heads": splice for name, splice in every_head.items()})
    per_passage = reconstruction_sweep(model, args.layer, sequences, conditions, prefix_len=prefix_len,
                                       passage_batch_size=args.passage_batch_size)
    per_passage.to_csv(out / "reconstruction.csv", index=False)
    reconstruction = reconstruction_table(per_passage)
    reconstruction.to_csv(out / "reconstruction_table.csv", index=False)
    plot_reconstruction(reconstruction, out / "reconstruction.png",
                        title=f"Cache splice, layer {args.layer} head {args.head}")

    text = "\n".join([
        f"Substitution test, layer {args.layer} head {args.head} ({len(passages)} passages x {passages.shape[1]} "
        f"tokens; WriteSAE and rank-2 at {args.amplitude} amplitude, flat+SVD at the native write's norm):",
        substitution.to_string(index=False, float_format=lambda x: f"{x:.4g}"),
        "",
        f"Reconstruction spliced into the cache ({sequences.shape[0]} sequences x {sequences.shape[1]} tokens, "
        f"split at {prefix_len}):",
        reconstruction.to_string(index=False, float_format=lambda x: f"{x:.5g}"),
    ])
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    settings = {k: str(v) for k, v in vars(args).items() if k != "command"}
    payload = {"settings": settings, "substitution": substitution.to_dict("records"),
               "reconstruction": reconstruction.to_dict("records")}
    (out / "summary.json").write_text(json.dumps(payload, indent=2, default=float), encoding="utf-8")
    return text
