"""Every recurrent cell of a model trained from one activation stream, against one single-cell run per cell.

The baseline is the single-cell path (``pipeline.train_state_sae``, SAELens' runner, one model pass per batch and
cell); the sweep prepares the same runners and trains them from one stream (``writesae_lens.sweeps.stream``: one
model pass per batch for every cell). Both train every cell on the same tokens with the same settings and seeds, in
the same process, one after the other; the script checks that both give the same SAEs and prints the wall times
and their ratio, for final-token states (the paper's recipe: one state per context) and, with ``--all-positions``,
for states at every position.

    OMP_NUM_THREADS=1 python bench/bench_sweep.py --threads 1                   # qwen35-tiny, 12 cells
    OMP_NUM_THREADS=1 python bench/bench_sweep.py --threads 1 --all-positions
    OMP_NUM_THREADS=1 python bench/bench_sweep.py --threads 1 --batches-per-pass 16
    OMP_NUM_THREADS=1 python bench/bench_sweep.py --threads 1 --ranks 2       # + `writesae sweep`, 1 rank vs torchrun

``--ranks N`` also times the whole command (``writesae sweep``: training, substitution test, table) on the same
cells in one process and under ``torchrun --nproc-per-node N`` (gloo on CPU), and checks both give the same table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def settings_for(args, layer: int, head: int):
    from writesae_lens import pipeline

    if args.all_positions:
        return pipeline.TrainSettings(layer=layer, head=head, d_sae=args.d_sae, k=args.k, context_size=args.context,
                                      training_tokens=args.steps * args.context * 4, batch_tokens=args.context * 4,
                                      lr=1e-3, warmup_steps=1, seed=layer * 100 + head)
    return pipeline.TrainSettings(layer=layer, head=head, d_sae=args.d_sae, k=args.k, context_size=args.context,
                                  training_tokens=args.steps * 16, batch_tokens=16, lr=1e-3, warmup_steps=1,
                                  final_token_only=True, seed=layer * 100 + head)


def sweep_config(args, cells) -> str:
    lines = [f'model = "{args.model}"', "seeds = [0]", "[cells]",
             "list = [" + ", ".join(f"[{layer}, {head}]" for layer, head in cells) + "]", "[train]",
             f"context_size = {args.context}"]
    if args.all_positions:
        lines += [f"training_tokens = {args.steps * args.context * 4}", f"batch_tokens = {args.context * 4}"]
    else:
        lines += [f"training_tokens = {args.steps * 16}", "batch_tokens = 16", "final_token_only = true"]
    lines += ["lr = 1e-3", "warmup_steps = 1", "[[variants]]", 'name = "topk"', f"d_sae = {args.d_sae}",
              f"k = {args.k}", "[substitution]", "passages = 4", "passage_len = 32", "max_firings_per_feature = 4",
              "metrics_passages = 2"]
    return "\n".join(lines) + "\n"


def time_command(prefix: list[str], config: Path, out: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([*prefix, "-m", "writesae_lens.cli", "sweep", str(config), "--out", str(out),
                           "--no-progress"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen35-tiny")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=64, help="tokens per context")
    parser.add_argument("--steps", type=int, default=6, help="training steps per cell")
    parser.add_argument("--d-sae", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--all-positions", action="store_true", help="states at every position (default: final token)")
    parser.add_argument("--batches-per-pass", type=int, default=1,
                        help="the stream's model batches per forward pass (1: exactly the single-cell passes)")
    parser.add_argument("--ranks", type=int, default=0,
                        help="also time `writesae sweep` in one process and under torchrun with this many ranks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from sae_lens import SAE

    import writesae_lens.saes  # noqa: F401
    from writesae_lens import pipeline
    from writesae_lens.data import load_heldout_documents
    from writesae_lens.models import load_hooked_model
    from writesae_lens.sweeps.stream import prepare_cell, train_cells

    model = load_hooked_model(args.model)
    documents, _ = pipeline.split_documents(load_heldout_documents())
    cells = [(layer, head) for layer in model.cfg.recurrent_layers for head in range(model.cfg.n_heads)]
    recipe = "all positions" if args.all_positions else "final token"
    example = settings_for(args, *cells[0])
    print(f"{args.model}: {len(cells)} cells, {recipe}, context {args.context}, {args.steps} steps of "
          f"{example.batch_tokens} states, d_sae {args.d_sae}, k {args.k}, {args.threads} thread(s)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        for layer, head in cells:
            pipeline.train_state_sae(model, documents, settings_for(args, layer, head),
                                     root / "alone" / f"{layer}-{head}")
        separate = time.perf_counter() - start

        start = time.perf_counter()
        prepared = [prepare_cell(f"{layer}-{head}", pipeline.train_state_sae, model, documents,
                                 settings_for(args, layer, head), root / "stream" / f"{layer}-{head}", "cpu")
                    for layer, head in cells]
        prepare = time.perf_counter() - start
        train_cells(prepared, progress=False, batches_per_pass=args.batches_per_pass)
        stream = time.perf_counter() - start

        worst = 0.0
        for layer, head in cells:
            a = SAE.load_from_disk(root / "alone" / f"{layer}-{head}").state_dict()
            b = SAE.load_from_disk(root / "stream" / f"{layer}-{head}").state_dict()
            worst = max([worst] + [float((a[n] - b[n]).abs().max()) for n in a])
    print(f"separate single-cell runs: {separate:8.2f} s")
    print(f"one stream ({args.batches_per_pass} batch(es) per pass): {stream:8.2f} s "
          f"(of which preparing the {len(cells)} runners {prepare:.2f} s)")
    print(f"ratio separate / stream:   {separate / stream:8.2f}x")
    print(f"largest weight difference between the two: {worst:.3g}")

    if args.ranks > 1:
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            config = root / "sweep.toml"
            config.write_text(sweep_config(args, cells), encoding="utf-8")
            one = time_command([sys.executable], config, root / "one", args.threads)
            many = time_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 str(args.ranks)], config, root / "many", args.threads)
            same = pd.read_csv(root / "one" / "results.csv").equals(pd.read_csv(root / "many" / "results.csv"))
        print(f"writesae sweep, 1 process:          {one:8.2f} s")
        print(f"writesae sweep, torchrun {args.ranks} ranks:   {many:8.2f} s ({one / many:.2f}x; gloo, "
              f"{args.threads} thread(s) per rank; same table: {same})")


if __name__ == "__main__":
    main()
