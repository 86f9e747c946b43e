"""The ``writesae`` command line: train a WriteSAE on a recurrent model's state and run the substitution test.

    writesae demo                                   # the embedded tiny Qwen3.5 model and text, a few minutes on CPU
    writesae train --model PATH --layer 9 --head 4 --out runs/L9H4
    writesae substitution --model PATH --sae runs/L9H4/sae --layer 9 --head 4 --out runs/L9H4-test

The analyses beyond these live in ``writesae_lens.commands`` (one module per subcommand, found automatically).
Every command writes its results through ``outputs.staged_output``: nothing appears in ``--out`` before the run
succeeded. Heavy libraries are imported after the arguments are parsed, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

from .commands import command_modules
from .commands.common import cell_arguments as _cell_arguments
from .commands.common import ignore_metadata_argument as _ignore_metadata_argument
from .commands.common import int_at_least as _int_at_least
from .commands.common import non_negative_int as _non_negative_int
from .commands.common import positive_float as _positive_float
from .commands.common import positive_int as _positive_int
from .commands.common import model_arguments as _model_arguments
from .commands.common import output_arguments as _output_arguments
from .commands.common import torch_dtype as _dtype
from .data import PRETRAINED_MODELS

# The demo's sizes: small enough for a few minutes on a 2-core CPU. Its cell (layer, head) is chosen by the memory
# report (evaluation.memory.choose_demo_cell) on `memory_passages` held-out passages of `memory_len` tokens.
DEMO = dict(model="qwen35-tiny", memory_passages=8, memory_len=256, d_sae=256, k=16, context_size=128, training_tokens=128 * 16 * 250,
            batch_tokens=128 * 16, lr=2e-3, warmup_steps=20, passages=48, passage_len=128,
            max_firings_per_feature=40, max_firings=1500, min_live_share=0.1, max_cells=3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="writesae",
        description="WriteSAEs on the matrix-valued state of recurrent language models (Gated DeltaNet, Mamba-2).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a WriteSAE on the embedded model and run the substitution test",
                          description="On a tiny model (Qwen3.5-architecture by default; --model) and held-out "
                          "text shipped with the package: train a WriteSAE through SAELens on one head's state, run "
                          "the substitution test, print the summary and write records and plots to --out. No "
                          "download; minutes on a CPU.")
    demo.add_argument("--out", type=Path, default=Path("writesae-demo"), help="output folder (default: %(default)s)")
    demo.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    demo.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    demo.add_argument("--seed", type=int, default=2026, help="seed of the firing sample and controls")
    demo.add_argument("--model", default=DEMO["model"], choices=sorted(PRETRAINED_MODELS),
                      help="which shipped model (default: %(default)s); its cell is chosen by its memory report")

    train = sub.add_parser("train", help="train a WriteSAE with SAELens on one head of a recurrent layer",
                           description="Train a rank-1 bilinear TopK WriteSAE with SAELens' training runner on "
                           "blocks.LAYER.mixer.hook_state, head HEAD, and save it (SAE.load_from_disk reads it).")
    _model_arguments(train)
    _cell_arguments(train)
    train.add_argument("--d-sae", type=_positive_int, default=2048,
                       help="dictionary size (default: %(default)s, the paper's)")
    train.add_argument("--k", type=_positive_int, default=32, help="active atoms per state (default: %(default)s)")
    train.add_argument("--context-size", type=_positive_int, default=1024,
                       help="tokens per context (default: %(default)s)")
    train.add_argument("--training-tokens", type=_positive_int, default=2_000_000,
                       help="tokens of states to train on (at least one batch)")
    train.add_argument("--batch-tokens", type=_positive_int, default=4096,
                       help="states per training batch (at most 16 contexts' worth: SAELens' buffer)")
    train.add_argument("--lr", type=_positive_float, default=3e-4,
                       help="peak learning rate, cosine to lr/10 (default: %(default)s)")
    train.add_argument("--warmup-steps", type=_non_negative_int, default=50,
                       help="linear warm-up steps (default: %(default)s)")
    train.add_argument("--final-token-only", action="store_true",
                       help="train only on the state after each context's last token (the paper's code)")
    train.add_argument("--seed", type=int, default=42)
    _output_arguments(train)

    subst = sub.add_parser("substitution", help="run the substitution test with a trained WriteSAE",
                           description="At positions where the SAE fires, replace the native write by the dominant "
                           "atom, by nothing, and by a random atom; record the KL of the next-token distribution "
                           "against the native one; print the statistics and save records and plots.")
    _model_arguments(subst)
    _cell_arguments(subst)
    subst.add_argument("--sae", type=Path, required=True, help="folder of a saved WriteSAE (SAE.load_from_disk)")
    _ignore_metadata_argument(subst)
    subst.add_argument("--passages", type=_positive_int, default=200, help="evaluation passages (default: %(default)s)")
    subst.add_argument("--passage-len", type=_int_at_least(2, "an integer >= 2 (an edit needs a later position)"),
                       default=512, help="tokens per passage (default: %(default)s)")
    subst.add_argument("--max-firings-per-feature", type=_positive_int, default=300,
                       help="cap per feature (default: %(default)s)")
    subst.add_argument("--max-firings", type=_positive_int, default=None, help="cap on all firings (default: none)")
    subst.add_argument("--amplitude", choices=["natural", "native_norm"], default="natural",
                       help="atom at its SAE coefficient, or rescaled to the native write's norm")
    subst.add_argument("--timing", choices=["after_read", "write"], default="after_read",
                       help="edit the cache after position t is read (the paper's), or the write itself")
    subst.add_argument("--kl-at", choices=["next", "end"], default="next",
                       help="read the KL at the first output the edit can change, or at the passage end")
    subst.add_argument("--batch-size", type=_positive_int, default=192,
                       help="rows (firings x 3 conditions) per batch; lower it to use less memory (default: %(default)s)")
    subst.add_argument("--passage-batch-size", type=_positive_int, default=8,
                       help="passages per forward pass of the scan and the native passes (they hold the cache "
                       "snapshots); lower it to use less memory (default: %(default)s)")
    subst.add_argument("--seed", type=int, default=2026)
    _output_arguments(subst)

    for module in command_modules():
        command = sub.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input is one line on stderr and exit code 2; Ctrl-C (or SIGTERM) ends the run with exit
    code 130 and leaves ``--out`` as it was (results are staged: ``outputs.staged_output``)."""
    args = build_parser().parse_args(argv)
    runners = {"demo": run_demo, "train": run_train, "substitution": run_substitution}
    runners.update({module.NAME: module.run for module in command_modules()})
    try:
        with _sigterm_as_interrupt():
            return runners[args.command](args)
    except (ValueError, TypeError, OSError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"writesae {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        where = f"; {out} was left as it was" if out is not None else ""
        print(f"writesae {args.command}: interrupted{where}", file=sys.stderr)
        return 130


class _sigterm_as_interrupt:
    """Within the block, SIGTERM raises KeyboardInterrupt (as Ctrl-C does), so staged results are cleaned up."""

    def __enter__(self):
        self.previous = None
        if _in_main_thread():
            self.previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_demo(args) -> int:
    import torch

    from .outputs import staged_output

    torch.manual_seed(0)
    with staged_output(args.out, args.overwrite) as out:
        text, elapsed = _demo(args, out)
    print(text)
    print(f"\nrecords, summary and plots in {args.out}/ ({elapsed:.0f} s)")
    return 0


def _demo(args, out: Path) -> tuple[str, float]:
    from . import pipeline
    from .evaluation.demo_cell import train_on_a_live_cell
    from .evaluation.firings import scan_firings
    from .evaluation.memory import memory_report
    from .models import load_hooked_model

    start = time.perf_counter()
    name = getattr(args, "model", DEMO["model"])
    print(f"[1/3] loading the embedded model {name!r} and its held-out text")
    model = load_hooked_model(name, device=args.device)
    train_docs, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
    passages = pipeline.token_passages(model, eval_docs, DEMO["passages"], DEMO["passage_len"]).to(args.device)
    long_passages = pipeline.token_passages(model, eval_docs, DEMO["memory_passages"], DEMO["memory_len"])
    report = memory_report(model, long_passages.to(args.device), progress=False)

    def train(layer: int, head: int):
        settings = pipeline.TrainSettings(
            layer=layer, head=head, d_sae=DEMO["d_sae"], k=DEMO["k"], context_size=DEMO["context_size"],
            training_tokens=DEMO["training_tokens"], batch_tokens=DEMO["batch_tokens"], lr=DEMO["lr"],
            warmup_steps=DEMO["warmup_steps"],
        )
        print(f"[2/3] training a WriteSAE (d_sae {settings.d_sae}, k {settings.k}) with SAELens on "
              f"blocks.{layer}.mixer.hook_state, head {head}")
        folder = out / "cells" / f"L{layer}H{head}"  # the kept one moves to out / "sae" below
        return pipeline.train_state_sae(model, train_docs, settings, folder, device=args.device), settings, folder

    def live_share(trained, layer: int, head: int) -> float:
        return float(scan_firings(model, trained[0], layer, head, passages, progress=False).alive.float().mean())

    _, _, (sae, settings, folder), reason = train_on_a_live_cell(report, train, live_share,
                                                                 min_live_share=DEMO["min_live_share"],
                                                                 max_cells=DEMO["max_cells"])
    folder.rename(out / "sae")  # inside the staged output folder: nothing is visible until the demo completes
    shutil.rmtree(out / "cells")  # the SAEs of cells passed over
    print(f"      the cell (the memory report proposes, the SAE's firing density confirms): {reason}")
    print(f"[3/3] substitution test on {passages.shape[0]} held-out passages of {passages.shape[1]} tokens")
    _, _, text = pipeline.run_substitution(model, sae, settings.layer, settings.head, passages, out,
                                           seed=args.seed, max_firings_per_feature=DEMO["max_firings_per_feature"],
                                           max_firings=DEMO["max_firings"])
    pipeline.save_settings(out, demo=DEMO | {"model": name}, train=settings, seed=args.seed, cell_reason=reason)
    return text, time.perf_counter() - start


def run_train(args) -> int:
    from . import pipeline
    from .commands.common import input_paths
    from .models import load_hooked_model
    from .outputs import check_output_folder, staged_output

    check_output_folder(args.out, args.overwrite)
    settings = pipeline.TrainSettings(
        layer=args.layer, head=args.head, d_sae=args.d_sae, k=args.k, context_size=args.context_size,
        training_tokens=args.training_tokens, batch_tokens=args.batch_tokens, lr=args.lr,
        warmup_steps=args.warmup_steps, final_token_only=args.final_token_only, seed=args.seed,
    )
    pipeline.check_train_settings(settings)  # before the model is loaded
    model = load_hooked_model(args.model, device=args.device, dtype=_dtype(args.dtype))
    train_docs, _ = pipeline.split_documents(pipeline.load_texts(args.text))
    with staged_output(args.out, args.overwrite, inputs=input_paths(args)) as out:
        pipeline.train_state_sae(model, train_docs, settings, out / "sae", device=args.device)
        pipeline.save_settings(out, model=args.model, text=args.text, train=settings)
    print(f"saved the WriteSAE in {args.out / 'sae'}")
    return 0


def run_substitution(args) -> int:
    from . import pipeline
    from .commands.common import heldout_passages, input_paths, load_model, load_sae
    from .outputs import check_output_folder, staged_output

    check_output_folder(args.out, args.overwrite)
    model = load_model(args)
    sae = load_sae(args.sae, args.device)
    passages = heldout_passages(model, args, args.passages, args.passage_len, whole_text=True)
    with staged_output(args.out, args.overwrite, inputs=input_paths(args)) as out:
        _, _, text = pipeline.run_substitution(
            model, sae, args.layer, args.head, passages, out, seed=args.seed,
            max_firings_per_feature=args.max_firings_per_feature, max_firings=args.max_firings,
            amplitude=args.amplitude, timing=args.timing, kl_at=args.kl_at, batch_size=args.batch_size,
            passage_batch_size=args.passage_batch_size, ignore_sae_metadata=args.ignore_sae_metadata,
        )
        pipeline.save_settings(out, **{k: v for k, v in vars(args).items() if k != "command"})
    print(text)
    print(f"\nrecords, summary and plots in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
