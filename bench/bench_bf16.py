"""The substitution test in bfloat16 against float32 on the same firings (issue #18), and what the fix costs.

    python bench/bench_bf16.py --threads 1                    # trains the demo SAE first (as `writesae demo` does)
    python bench/bench_bf16.py --threads 1 --sae writesae-demo/sae   # the SAE of an earlier `writesae demo`

The demo cell: the shipped qwen35-tiny, layer 1 head 0, the demo's SAE, passages and firing sample (48 held-out
passages x 128 tokens, at most 40 firings per feature and 1,500 in all, seed 2026). The float32 run selects the
firings; the bfloat16 runs test the same (passage, position, feature) triples (``replacement_test(firings=...)``),
dropping positions where the bfloat16 scan has no active feature. Compared on the firings whose substituted atom is
the same in both dtypes:

- per condition, the median of |log(KL_bf16 / KL_fp32)| (printed as the ratio exp(median); goal <= 1.25x);
- the win/loss verdict (KL_atom < KL_delete) of bf16 against fp32 on firings whose two fp32 KLs differ by more than
  25 % (the larger over the smaller > 1.25; goal >= 90 % agreement).

Three bfloat16 paths: ``fixed`` (the default: an unedited native row through the same computation as the
conditions, the layers from the edited one on in float32), ``bf16 tail`` (the same native row, those layers in
bfloat16: ``precision="model"``), ``earlier`` (the protocol before #18: KLs against the batched native pass, all in
bfloat16). The cost is each path's wall time (median of ``--repeats``) over the earlier path's, same process.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from writesae_lens import pipeline
from writesae_lens.cli import DEMO

CELL = (1, 0)  # the cell the figures in the docs were measured on (the demo's before it chose its cell by memory)
from writesae_lens.evaluation import substitution
from writesae_lens.evaluation.edited_runs import EditedRuns
from writesae_lens.evaluation.firings import scan_firings
from writesae_lens.evaluation.records import CONDITIONS
from writesae_lens.evaluation.substitution import replacement_test
from writesae_lens.models import load_hooked_model


def demo_sae(model, train_docs, path: Path | None, cache: Path):
    """The SAE at ``path``, or the demo's SAE trained (once) into ``cache``."""
    from writesae_lens.commands.common import load_sae

    if path is not None:
        return load_sae(path, "cpu")
    if not (cache / "cfg.json").exists():
        settings = pipeline.TrainSettings(
            layer=CELL[0], head=CELL[1], d_sae=DEMO["d_sae"], k=DEMO["k"],
            context_size=DEMO["context_size"], training_tokens=DEMO["training_tokens"],
            batch_tokens=DEMO["batch_tokens"], lr=DEMO["lr"], warmup_steps=DEMO["warmup_steps"],
        )
        torch.manual_seed(0)  # as `writesae demo`
        pipeline.train_state_sae(model, train_docs, settings, cache, device="cpu")
    return load_sae(cache, "cpu")


def agreement(bf16, fp32, margin: float = 1.25) -> tuple[float, int]:
    """Share of firings (with fp32 KLs apart by more than ``margin``x) whose win/loss verdict is the same in both."""
    low = np.minimum(fp32.kl_atom, fp32.kl_delete)
    apart = np.maximum(fp32.kl_atom, fp32.kl_delete) > margin * low
    same = (bf16.kl_atom < bf16.kl_delete) == (fp32.kl_atom < fp32.kl_delete)
    return float(same[apart].mean()), int(apart.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", type=Path, default=None, help="a saved demo SAE (default: train it, as the demo)")
    parser.add_argument("--sae-cache", type=Path, default=Path("bench-bf16-sae"),
                        help="where the trained demo SAE is kept between runs (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each bf16 path (medians)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_hooked_model(DEMO["model"]).eval()
    train_docs, eval_docs = pipeline.split_documents(pipeline.load_texts(None))
    sae = demo_sae(model, train_docs, args.sae, args.sae_cache)
    passages = pipeline.token_passages(model, eval_docs, DEMO["passages"], DEMO["passage_len"])
    layer, head = CELL
    fp32 = replacement_test(model, sae, layer, head, passages, seed=2026, progress=False,
                            max_firings_per_feature=DEMO["max_firings_per_feature"], max_firings=DEMO["max_firings"])

    bf16_model = load_hooked_model(DEMO["model"], dtype=torch.bfloat16).eval()
    scan = scan_firings(bf16_model, sae, layer, head, passages, progress=False)
    firing = {(p, t) for p, t in zip(scan.passage.tolist(), scan.position.tolist())}
    keep = [(p, t) in firing for p, t in zip(fp32.passage, fp32.position)]
    firings = fp32.loc[keep, ["passage", "position", "feature"]]

    earlier_runs = functools.partial(EditedRuns, reference="pass")
    paths = {
        "earlier": dict(patch=earlier_runs, precision="model"),
        "bf16 tail": dict(patch=None, precision="model"),
        "fixed": dict(patch=None, precision="float32"),
    }
    replacement_test(bf16_model, sae, layer, head, passages, firings=firings[:8], progress=False)  # warm-up
    results, seconds = {}, {}
    for name, path in paths.items():
        def run(path=path):
            with mock.patch.object(substitution, "EditedRuns", path["patch"] or EditedRuns):
                return replacement_test(bf16_model, sae, layer, head, passages, firings=firings,
                                        precision=path["precision"], progress=False)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results[name] = run()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)

    print(f"demo cell: {DEMO['model']} L{layer} H{head}, {len(fp32)} fp32 firings, {len(firings)} also firing in "
          f"bf16 (threads {torch.get_num_threads()})")
    for name, records in results.items():
        both = records.merge(fp32, on=["passage", "position", "feature"], suffixes=("", "_fp32"))
        both = both[both.atom == both.atom_fp32]
        with np.errstate(divide="ignore"):  # a bf16 KL of exactly 0 (the earlier path) is an infinite log ratio
            medians = {c: float(np.median(np.abs(np.log(both[f"kl_{c}"] / both[f"kl_{c}_fp32"]))))
                       for c in CONDITIONS}
        bf16_side = both[["kl_atom", "kl_delete"]]
        fp32_side = both[["kl_atom_fp32", "kl_delete_fp32"]].set_axis(["kl_atom", "kl_delete"], axis=1)
        agree, n_apart = agreement(bf16_side, fp32_side)
        floor = records["kl_floor"].max()
        ratios = ", ".join(f"{c} {np.exp(m):.3f}x (|log| {m:.3f})" for c, m in medians.items())
        print(f"{name:>9}: {len(both)} firings with the same atom; median KL ratio {ratios}; win/loss agreement "
              f"{100 * agree:.1f}% of {n_apart} firings with fp32 KLs > 25% apart; floor {floor:.2g}, "
              f"{int(records['below_floor'].sum()) if np.isfinite(floor) else 'n/a'} firings at or below it; "
              f"{seconds[name]:.2f} s = {seconds[name] / seconds['earlier']:.2f}x the earlier path")
    print(f"goals: median ratio <= 1.25x (|log| <= {np.log(1.25):.3f}) per condition, agreement >= 90%; fp32 run's "
          f"floor {fp32['kl_floor'].max():.2g}")


if __name__ == "__main__":
    main()
