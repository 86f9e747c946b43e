"""``writesae sweep CONFIG --out OUT``: many cells x seeds x variants, trained from one activation stream."""

from __future__ import annotations

from pathlib import Path

NAME = "sweep"
HELP = "train and test WriteSAEs on many cells x seeds x variants from one activation stream (resumable)"
DESCRIPTION = ("Train every run of a sweep config (cells x seeds x variants) from one activation stream (one model "
               "pass per batch feeds every cell's SAELens trainer), run the substitution test on each, and write "
               "one results table (CSV, Parquet) and a layer x head heatmap of the win rate per variant. Rerunning "
               "into the same --out resumes: finished runs are skipped. Under `torchrun --nproc-per-node N` the runs "
               "are split across the processes (gloo on CPU, NCCL with device = \"cuda\"). See docs/sweeps.md.")


def add_arguments(parser) -> None:
    parser.add_argument("config", type=Path, help="sweep config file (.toml or .json; see docs/sweeps.md)")
    parser.add_argument("--out", type=Path, required=True,
                        help="sweep folder: new, empty, or this sweep's own (to resume it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..sweeps.distributed import world_from_environment
    from ..sweeps.run import run_sweep

    ranks = world_from_environment()
    table = run_sweep(args.config, args.out, progress=not args.no_progress, ranks=ranks)
    if ranks.is_main:
        finished = int(table["win_rate"].notna().sum()) if table is not None else 0
        print(f"{len(table)} runs in {args.out}/results.csv (and .parquet), {finished} with a win rate; heatmaps in "
              f"{args.out}/heatmaps/")
    return 0
