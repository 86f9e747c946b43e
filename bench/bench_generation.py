"""The batched generation engine on the install protocol at the paper's size, against generating each trial alone.

    python bench/bench_generation.py                     # the shipped qwen35-tiny, layer 1 head 0, 1 thread
    python bench/bench_generation.py --threads 2 --loop-trials 400

The protocol (paper section 6.3): 30 prompts x 5 windows x 8 targets x 3 magnitudes = 3,600 edited trials, plus
one native continuation per prompt and one matched-norm random control per prompt x window x m, 20 greedy tokens
each. The batched side is ``install_trials`` end to end (native runs, target choice, every row in batches of
``--batch-size``). The loop side generates each trial alone (one row per ``generate_rows`` call: its prompt, its
three edits); it runs on ``--loop-trials`` trials drawn at random (seeded) and its time per trial is scaled to all
rows; those trials' tokens must equal the batched rows' (checked, printed). Goal: >= 10x on a 2-core CPU.

Then the decoding time per token of batched edited rows (32 rows, 32 new tokens) at contexts 64, 256 and 1024, on
the model and on mamba2-tiny (goal: flat, ratio 1024/64 <= 1.2; a hybrid's attention layers read a KV cache that
grows with the context, the recurrent layers carry a state of fixed size).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import paired_times  # noqa: E402

from writesae_lens import pipeline  # noqa: E402
from writesae_lens.generation import CacheEdit, generate_rows  # noqa: E402
from writesae_lens.generation.install import InstallSettings, install_trials, plan_install  # noqa: E402
from writesae_lens.generation.targets import frequent_tokens, paper_target_classes, word_tokens  # noqa: E402
from writesae_lens.models import load_hooked_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen35-tiny")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--loop-trials", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_hooked_model(args.model, device=args.device)
    train, held = pipeline.split_documents(pipeline.load_texts(None))
    prompts = list(pipeline.token_passages(model, held, args.prompts, args.prompt_len))
    vocab = model.cfg.d_vocab
    scaled = vocab < 248_320  # the shipped models' 4,096-token vocabulary: smaller rank windows
    classes = paper_target_classes(frequent_tokens(model, train[:500]), word_tokens(model),
                                   rare=2000 if scaled else 10_000, out_of_context=1000 if scaled else 17_000)
    settings = InstallSettings()

    start = time.perf_counter()
    records = install_trials(model, args.layer, args.head, prompts, classes, settings, batch_size=args.batch_size)
    batched = time.perf_counter() - start
    plan = plan_install(model, args.layer, args.head, prompts, classes, settings, batch_size=args.batch_size)
    n_rows = len(plan.rows) + len(prompts)  # edited and random rows, plus the native ones
    print(f"install protocol: {len(prompts)} prompts, {len(records)} edited trials, {n_rows} rows in all "
          f"({settings.max_new_tokens} greedy tokens); batched, end to end: {batched:.1f} s")

    # the loop: each trial alone; its tokens must equal the batched rows'
    full = generate_rows(model, plan.rows, max_new_tokens=settings.max_new_tokens, edits=plan.edits,
                         batch_size=args.batch_size)
    chosen = random.Random(0).sample(range(len(plan.rows)), min(args.loop_trials, len(plan.rows)))
    by_row = {}
    for e in plan.edits:
        by_row.setdefault(e.row, []).append(e)
    mismatches = 0
    start = time.perf_counter()
    for r in chosen:
        edits = [CacheEdit(**{**e.__dict__, "row": 0}) for e in by_row[r]]
        alone = generate_rows(model, [plan.rows[r]], max_new_tokens=settings.max_new_tokens, edits=edits)
        mismatches += int(alone.tokens[0].tolist() != full.tokens[r].tolist())
    per_trial = (time.perf_counter() - start) / len(chosen)
    loop = per_trial * n_rows
    print(f"loop, each trial alone: {per_trial * 1e3:.0f} ms per trial x {n_rows} rows = {loop:.0f} s "
          f"(timed on {len(chosen)} random trials)")
    print(f"speed-up: {loop / batched:.1f}x (goal >= 10x); identical tokens: {len(chosen) - mismatches}/{len(chosen)}")

    # decoding per token against the context length: the hybrid, and a model with recurrent layers only
    for name in dict.fromkeys([args.model, "mamba2-tiny"]):
        report_decode_scaling(load_hooked_model(name, device=args.device) if name != args.model else model, name,
                              args.layer, args.head)


def report_decode_scaling(model, name: str, layer: int, head: int) -> None:
    def runs(context: int):
        prompt = torch.randint(0, model.cfg.d_vocab, (context,), generator=torch.Generator().manual_seed(context))
        rows = [prompt] * 32
        edits = [CacheEdit(r, context - 2, layer, head, value=torch.ones(model.cfg.d_v), scale=1.0, relative=True)
                 for r in range(32)]
        return (lambda: generate_rows(model, rows, max_new_tokens=33, edits=edits),
                lambda: generate_rows(model, rows, max_new_tokens=1, edits=edits))

    per_token = {}
    for context in (64, 256, 1024):
        with_decode, prefill_only = runs(context)
        long, short, _ = paired_times(with_decode, prefill_only, 3)
        per_token[context] = (long - short) / 32
    print(f"{name}: decoding 32 edited rows, ms per token at context 64 / 256 / 1024: "
          + " / ".join(f"{per_token[c] * 1e3:.2f}" for c in (64, 256, 1024))
          + f" -> ratio 1024/64 {per_token[1024] / per_token[64]:.2f} (goal <= 1.2)")

if __name__ == "__main__":
    main()
