"""Time to build the dashboards of 256 atoms of the demo SAE (issue #19; goal: under 2 minutes on a 2-core CPU).

    python bench/bench_dashboard.py --threads 2                       # trains the demo SAE first, as `writesae demo`
    python bench/bench_dashboard.py --threads 2 --sae writesae-demo/sae  # reuses a saved demo SAE

The SAE is the demo's (qwen35-tiny, layer 1, head 0, d_sae 256, k 16, trained through SAELens with the demo's
settings by ``pipeline.train_state_sae``); the scan covers the demo's 48 held-out passages of 128 tokens. The timed
build is what ``writesae dashboard --atoms 256`` does after loading: scan, per-atom data, 256 pages, the index and
features.json. Printed: each stage, the total, its ratio to the 120 s goal, and as a baseline measured in the same
run the substitution test's own scan (``scan_firings``) over the same passages: ``total / scan`` is what the
dashboards cost beyond the pass any analysis of the SAE needs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

GOAL_S = 120.0
CELL = (1, 0)  # the cell the figures in the docs were measured on (the demo's before it chose its cell by memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--sae", type=Path, default=None, help="a saved demo SAE (default: train one as the demo does)")
    parser.add_argument("--atoms", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from writesae_lens import pipeline
    from writesae_lens.cli import DEMO
    from writesae_lens.commands.common import load_sae
    from writesae_lens.dashboard import atom_dashboards, scan_for_dashboards, write_dashboard
    from writesae_lens.evaluation.firings import scan_firings
    from writesae_lens.models import load_hooked_model

    model = load_hooked_model(DEMO["model"])
    train_docs, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
    with tempfile.TemporaryDirectory() as tmp:
        if args.sae is None:
            settings = pipeline.TrainSettings(
                layer=CELL[0], head=CELL[1], d_sae=DEMO["d_sae"], k=DEMO["k"],
                context_size=DEMO["context_size"], training_tokens=DEMO["training_tokens"],
                batch_tokens=DEMO["batch_tokens"], lr=DEMO["lr"], warmup_steps=DEMO["warmup_steps"])
            start = time.perf_counter()
            sae = pipeline.train_state_sae(model, train_docs, settings, Path(tmp) / "sae")
            print(f"trained the demo SAE in {time.perf_counter() - start:.1f} s (not part of the timed build)")
        else:
            sae = load_sae(args.sae, "cpu")
        tokens = pipeline.token_passages(model, eval_docs, DEMO["passages"], DEMO["passage_len"])

        start = time.perf_counter()
        scan_firings(model, sae, CELL[0], CELL[1], tokens, progress=False)
        baseline = time.perf_counter() - start

        out = Path(tmp) / "dashboard"
        out.mkdir()
        t0 = time.perf_counter()
        scan = scan_for_dashboards(model, sae, CELL[0], CELL[1], tokens, progress=False)
        t1 = time.perf_counter()
        data = atom_dashboards(model, sae, scan, n_atoms=args.atoms, progress=False)
        t2 = time.perf_counter()
        write_dashboard(data, out, progress=False)
        t3 = time.perf_counter()
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())

    total = t3 - t0
    print(f"dashboards of {len(data.atoms)} atoms ({tokens.shape[0]} passages x {tokens.shape[1]} tokens, "
          f"{args.threads} threads, {size / 2**20:.1f} MiB written)")
    print(f"  scan {t1 - t0:.2f} s, per-atom data {t2 - t1:.2f} s, pages + index + json {t3 - t2:.2f} s")
    print(f"  total {total:.2f} s: {total / GOAL_S:.3f} of the {GOAL_S:.0f} s goal ({GOAL_S / total:.1f}x under it)")
    print(f"  baseline: the substitution scan alone {baseline:.2f} s; dashboards / scan = {total / baseline:.1f}x")


if __name__ == "__main__":
    main()
