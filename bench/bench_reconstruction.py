"""The reconstruction-in-the-cache sweep (paper-method §8.3) against the straightforward protocol, same model, same
conditions, same losses.

    python bench/bench_reconstruction.py                      # the shipped qwen35-tiny, 8 passages of 1,024 tokens
    python bench/bench_reconstruction.py --threads 1 --passages 16

Conditions (the paper's sweep on one cell): the state of one head of layer ``--layer`` replaced by a WriteSAE's
reconstruction, by a flat SAE's (SAELens' ``TopKSAE``), and by its rank-r truncations (r = 1, 2, 4, 8, 16; 32 is the
full rank of the shipped model's 32 x 32 states); the native run besides. The SAEs have random weights with the
decoder bias at the data mean (the timing does not depend on training).

The straightforward protocol (what the authors' scripts do): per passage and per condition, run the prefix with a
cache (batch 1; logits computed, as a transformers forward does), replace the head's state, run the suffix with its
loss. ``reconstruction_sweep`` runs the prefix once per passage batch for every condition, and each condition's
suffix only from the edited layer on, with conditions x passages as rows of one batch. Printed: both times (median of
paired runs), the ratio (goal >= 10x), the largest difference of any loss between the two, and the straightforward
time over the work no exact method avoids (one prefix per passage; per condition the suffix from the edited layer on,
with its unembedding and loss), timed at batch 1. Where batching gains nothing (a CPU) that is about the most an exact
method reaches; on an accelerator, batching the rows is where more would come from.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reconstruction_reference import straightforward  # noqa: E402
from sae_checks import firing_sae  # noqa: E402

from writesae_lens import pipeline  # noqa: E402
from writesae_lens.evaluation.cache_reconstruction import (  # noqa: E402
    reconstruction_sweep,
    standard_conditions,
)
from writesae_lens.evaluation.firings import head_states  # noqa: E402
from writesae_lens.models import load_hooked_model  # noqa: E402


def flat_sae(model, tokens, layer: int, head: int, d_sae: int, k: int):
    """SAELens' own flat TopK SAE with random weights and the decoder bias at the data mean."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(1)
    d_in = model.cfg.d_k * model.cfg.d_v
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    states, _ = head_states(model, tokens, layer, head)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T)
        sae.b_dec.copy_(states.flatten(0, 1).mean(0))
    return sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen35-tiny")
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--pos", type=int, default=1024)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--head", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="paired timed runs of both protocols (medians)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_hooked_model(args.model)
    tokens = pipeline.token_passages(model, pipeline.load_texts(None), args.passages, args.pos)
    saes = {"writesae": {args.head: firing_sae(model, tokens, args.layer, args.head, d_sae=256, k=16)},
            "flat": {args.head: flat_sae(model, tokens, args.layer, args.head, d_sae=256, k=16)}}
    conditions = standard_conditions(model, [args.head], saes)
    prefix_len = args.pos // 2

    def fast():
        return reconstruction_sweep(model, args.layer, tokens, conditions, prefix_len=prefix_len, progress=False)

    def slow():
        return straightforward(model, args.layer, tokens, conditions, prefix_len)

    fast(), slow()  # warm-up
    pairs, table, reference = [], None, None
    for _ in range(args.repeats):
        start = time.perf_counter()
        table = fast()
        middle = time.perf_counter()
        reference = slow()
        pairs.append((middle - start, time.perf_counter() - middle))
    fast_s = statistics.median(f for f, _ in pairs)
    slow_s = statistics.median(s for _, s in pairs)
    ratio = statistics.median(s / f for f, s in pairs)
    diff = max(abs(row.nll - reference[(row.passage, row.condition)]) for row in table.itertuples())
    bound = slow_s / exact_work(model, args.layer, tokens, prefix_len, len(conditions), args.repeats)
    n_runs = len(reference)
    print(f"model {args.model}, layer {args.layer} head {args.head}; {args.passages} passages x {args.pos} tokens "
          f"(prefix {prefix_len}), {len(conditions)} conditions + native = {n_runs} suffix losses; "
          f"{torch.get_num_threads()} threads")
    print(f"reconstruction_sweep: {fast_s:.2f} s; straightforward protocol (prefix rerun per condition, batch 1): "
          f"{slow_s:.2f} s -> ratio {ratio:.1f}x (median of {args.repeats} paired runs; goal >= 10x)")
    print(f"the work no exact method avoids (one prefix per passage, every suffix from layer {args.layer} on with its "
          f"loss), timed at batch 1: straightforward / that = {bound:.1f}x (where batching gains nothing, as on a CPU, "
          f"about the most any exact method reaches)")
    print(f"max |loss difference| between the two over {n_runs} losses: {diff:.2e} nats")


@torch.no_grad()
def exact_work(model, layer: int, tokens, prefix_len: int, n_conditions: int, repeats: int) -> float:
    """Seconds of the work no exact method avoids, timed at batch 1: per passage one prefix pass (no logits) and one
    native suffix, and per condition the suffix from the edited layer on with its loss (the splice's later layers and
    unembedding depend on the condition)."""
    from writesae_lens.evaluation.cache_reconstruction import suffix_nll

    one = tokens[:1]
    cache = model.empty_cache()
    prefix = statistics.median(_seconds(lambda: model(one[:, :prefix_len], cache=model.empty_cache(),
                                                       return_type=None)) for _ in range(repeats))
    model(one[:, :prefix_len], cache=cache, return_type=None)
    resid = {}
    with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", lambda x, hook: resid.setdefault("x", x))]):
        model(one[:, prefix_len:], cache=cache.copy(), return_type=None)

    def suffix():
        final = model(resid["x"], start_at_layer=layer, stop_at_layer=model.cfg.n_layers, cache=cache.copy())
        suffix_nll(model, final, one[:, prefix_len:])

    from_layer = statistics.median(_seconds(suffix) for _ in range(repeats))
    native = statistics.median(_seconds(lambda: suffix_nll(model, model(one[:, prefix_len:], cache=cache.copy(),
                                                                        stop_at_layer=model.cfg.n_layers),
                                                           one[:, prefix_len:])) for _ in range(repeats))
    return tokens.shape[0] * (prefix + native + n_conditions * from_layer)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
