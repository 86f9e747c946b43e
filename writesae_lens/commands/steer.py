"""``writesae steer``: the paper's other cache-edit probes (section 6), one subcommand each.

    writesae steer erase   --model M --layer L --head H --sae S --feature F --out DIR     (6.1, single-atom erasure)
    writesae steer amplify --model M --layer L --heads 0 1 .. --sae S0 S1 .. --out DIR   (6.4, amplification probe)

Each writes its tables as CSV, ``summary.txt`` / ``summary.json``, a plot and ``settings.json`` to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import heldout_passages, load_model, load_sae, model_arguments, output_arguments

NAME = "steer"
HELP = "single-atom erasure (erase) or the boundary-feature amplification probe (amplify)"
DESCRIPTION = ("erase: find the token an atom promotes on half of its firings, erase the write or the atom on the "
               "other half, write the atom where it is silent (with a dose table). amplify: push each head's "
               "sentence-boundary features at every decoding step and compare the sampled text with the baseline "
               "and a random-feature control (paired t-tests, Cohen's d_z, bootstrap CIs, Bonferroni).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="probe", required=True, metavar="PROBE")
    erase = sub.add_parser("erase", help="single-atom erasure (paper 6.1)")
    model_arguments(erase)
    erase.add_argument("--layer", type=int, required=True, help="a recurrent layer of the model")
    erase.add_argument("--head", type=int, required=True, help="a head of that layer")
    erase.add_argument("--sae", type=Path, required=True, help="folder of the head's saved WriteSAE")
    erase.add_argument("--feature", type=int, required=True, help="the atom to erase")
    erase.add_argument("--passages", type=int, default=200, help="held-out passages scanned (default: %(default)s)")
    erase.add_argument("--passage-len", type=int, default=256, help="tokens per passage (default: %(default)s)")
    erase.add_argument("--eval-firings", type=int, default=150, help="(default: %(default)s)")
    erase.add_argument("--nonfiring", type=int, default=150, help="non-firing positions (default: %(default)s)")
    erase.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="m for m a* A (1 2 4)")
    erase.add_argument("--dose-positions", type=int, default=50, help="(default: %(default)s)")
    erase.add_argument("--dose-multipliers", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
                       help="(default: 0.5 1 2 4 8 16)")
    erase.add_argument("--batch-size", type=int, default=128, help="rows per batch (default: %(default)s)")
    erase.add_argument("--seed", type=int, default=2026)
    output_arguments(erase)

    amplify = sub.add_parser("amplify", help="boundary-feature amplification probe (paper 6.4)")
    model_arguments(amplify)
    amplify.add_argument("--layer", type=int, required=True, help="a recurrent layer of the model")
    amplify.add_argument("--heads", type=int, nargs="+", required=True, help="heads, one SAE each")
    amplify.add_argument("--sae", type=Path, nargs="+", required=True, help="one saved WriteSAE per head, in order")
    amplify.add_argument("--prompts", type=int, default=40, help="held-out prompts (default: %(default)s)")
    amplify.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (default: %(default)s)")
    amplify.add_argument("--selection-passages", type=int, default=200, help="passages for the feature selection")
    amplify.add_argument("--passage-len", type=int, default=256, help="tokens per selection passage")
    amplify.add_argument("--boundary", default=".", help="the boundary token's text (default: %(default)r)")
    amplify.add_argument("--doses", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="(default: 2 5 10)")
    amplify.add_argument("--random-dose", type=float, default=10.0, help="(default: %(default)s)")
    amplify.add_argument("--top", type=int, default=10, help="features per head (default: %(default)s)")
    amplify.add_argument("--new-tokens", type=int, default=400, help="sampled tokens (default: %(default)s)")
    amplify.add_argument("--temperature", type=float, default=0.7, help="(default: %(default)s)")
    amplify.add_argument("--batch-size", type=int, default=64, help="rows per batch (default: %(default)s)")
    amplify.add_argument("--seed", type=int, default=2026)
    output_arguments(amplify)


def run(args) -> int:
    from ..outputs import check_output_folder

    check_output_folder(args.out, args.overwrite)
    return _erase(args) if args.probe == "erase" else _amplify(args)


def _erase(args) -> int:
    from .. import pipeline
    from ..generation.erasure import ErasureSettings, erasure_probe, format_erasure_summary, plot_dose
    from ..outputs import staged_output

    model = load_model(args)
    sae = load_sae(args.sae, args.device)
    passages = heldout_passages(model, args, args.passages, args.passage_len)
    settings = ErasureSettings(n_eval=args.eval_firings, n_nonfiring=args.nonfiring,
                               multipliers=tuple(map(float, args.multipliers)), n_dose=args.dose_positions,
                               dose_multipliers=tuple(map(float, args.dose_multipliers)), seed=args.seed)
    result = erasure_probe(model, sae, args.layer, args.head, args.feature, passages, settings,
                           batch_size=args.batch_size, progress=True)
    token_text = model.tokenizer.decode([result.preferred_token]) if model.tokenizer is not None else None
    text = format_erasure_summary(result, token_text)
    with staged_output(args.out, args.overwrite, inputs=[x for x in (args.sae, args.text) if x]) as out:
        result.detection.to_csv(out / "detection.csv", index=False)
        result.erasure.to_csv(out / "erasure.csv", index=False)
        result.nonfiring.to_csv(out / "nonfiring.csv", index=False)
        result.dose.to_csv(out / "dose.csv", index=False)
        (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
        (out / "summary.json").write_text(json.dumps(result.summary, indent=2, default=float), encoding="utf-8")
        plot_dose(result, out / "dose.png")
        pipeline.save_settings(out, **{k: v for k, v in vars(args).items() if k != "command"})
    print(text)
    print(f"\nrecords, summary and plot in {args.out}/")
    return 0


def _amplify(args) -> int:
    from .. import pipeline
    from ..generation.amplification import (AmplificationSettings, amplification_probe,
                                            format_amplification_summary, plot_amplification)
    from ..outputs import staged_output

    if len(args.heads) != len(args.sae):
        raise ValueError(f"--heads lists {len(args.heads)} heads but --sae {len(args.sae)} SAEs: give one SAE per head")
    model = load_model(args)
    if model.tokenizer is None:
        raise ValueError("the amplification probe measures decoded text: the model needs a tokenizer")
    boundary = model.tokenizer.encode(args.boundary, add_special_tokens=False)
    if len(boundary) != 1:
        raise ValueError(f"--boundary {args.boundary!r} is {len(boundary)} tokens; it must be exactly one")
    saes = {head: load_sae(path, args.device) for head, path in zip(args.heads, args.sae)}
    passages = heldout_passages(model, args, args.selection_passages, args.passage_len)
    prompts = list(heldout_passages(model, args, args.prompts, args.prompt_len).cpu())
    settings = AmplificationSettings(doses=tuple(map(float, args.doses)), random_dose=float(args.random_dose),
                                     n_top=args.top, max_new_tokens=args.new_tokens,
                                     temperature=float(args.temperature), seed=args.seed)
    result = amplification_probe(model, saes, args.layer, prompts, passages, boundary[0], settings,
                                 batch_size=args.batch_size, progress=True)
    text = format_amplification_summary(result.summary, result.floor)
    with staged_output(args.out, args.overwrite, inputs=[x for x in (*args.sae, args.text) if x]) as out:
        result.features.to_csv(out / "features.csv", index=False)
        result.records.to_csv(out / "records.csv", index=False)
        result.summary.to_csv(out / "summary.csv", index=False)
        (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
        (out / "summary.json").write_text(result.summary.to_json(orient="records", indent=2), encoding="utf-8")
        plot_amplification(result.summary, out / "amplification.png")
        pipeline.save_settings(out, **{k: v for k, v in vars(args).items() if k != "command"})
    print(text)
    print(f"\nrecords, summary and plot in {args.out}/")
    return 0
