"""Firings per second of ``replacement_test`` against the straightforward protocol, same model, same firings.

    python bench/bench_substitution.py                         # the shipped, trained qwen35-tiny on held-out text
    python bench/bench_substitution.py --shape tiny            # a random Qwen3.5 hybrid with a 512-token vocabulary
    python bench/bench_substitution.py --device cuda --shape qwen3.5-0.8b --dtype bfloat16 --passages 8 --pos 512

Default density: 4 passages x 512 tokens and 120 firings, i.e. 30 tested firings per passage, the paper's density
(4,851 firings in 164 passages of 512 tokens at L9 H4).

The straightforward protocol (what the paper's authors' code does) is implemented here: for each firing, run the
prefix with a cache; for each of the three conditions deep-copy the cache, edit the head's state after position t,
and run one decoding step at batch 1. Both must give the same KLs (the maximum difference is printed); the ratio of
firings per second is the figure of merit (goal >= 20x on CPU; >= 60 firings/s on an H200 for the 0.8B shape).
Both run the layers from the edited one on in ``replacement_test``'s comparison precision (float32 for a bfloat16
model: ``evaluation/tail_precision.py``, issue #18), so ``--dtype bfloat16`` times and checks the fixed path, the same
code the CPU bf16 tests run (tests/test_bf16_substitution.py).

Also printed: the time of one plain forward pass over all passages. Any exact method has to run every passage with
a firing through the model at least once (to find the firings and to reach the states they edit), so
``straightforward time / forward time`` bounds the ratio any such method can reach on that model and density.
Memory is printed per measured row (``bench/memory.py``): peak resident set size on CPU, peak allocated on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from memory import Peak, peak_memory  # noqa: E402  (bench/ is on sys.path when a script runs)
from qwen35_factory import randomise  # noqa: E402
from sae_checks import firing_sae  # noqa: E402

from writesae_lens.adapters.qwen35 import HookedQwen35  # noqa: E402
from writesae_lens.evaluation.substitution import head_states, replacement_test  # noqa: E402
from writesae_lens.evaluation.tail_precision import as_tail_input, comparison_model  # noqa: E402
from writesae_lens.interventions import atom_matrices  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, linear_key_head_dim=32, linear_value_head_dim=32,
                 linear_num_key_heads=4, linear_num_value_heads=4),
    "qwen3.5-0.8b": dict(vocab_size=248_320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_key_head_dim=128,
                         linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16),
}


def build_model(shape: str, device: str, dtype: torch.dtype) -> HookedQwen35:
    if shape == "qwen35-tiny":
        from writesae_lens.models import load_hooked_model

        return load_hooked_model("qwen35-tiny", device=device).to(dtype).eval()
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(0)
    hf = Qwen3_5ForCausalLM(Qwen3_5TextConfig(max_position_embeddings=4096, **SHAPES[shape])).eval()
    if shape == "tiny":
        randomise(hf, 0)
    return HookedQwen35.from_hf_model(hf, device=device, dtype=dtype).eval()


@torch.no_grad()
def straightforward_protocol(model, sae, layer, head, tokens, records) -> list[tuple[float, float, float]]:
    """Per firing: prefix forward with a cache, then per condition a deep copy, a state edit, one decode step. The
    layers before the edited one run in the model's dtype, the rest in the comparison precision (``tail``; the model
    itself for a float32 model)."""
    atoms = atom_matrices(sae, torch.arange(sae.cfg.d_sae), sae.cfg.d_sae).to(model.cfg.device)
    states, factors = head_states(model, tokens, layer, head)
    tail = comparison_model(model, layer)
    dtype = next(tail.blocks[layer].parameters()).dtype
    out = []
    for row in records.drop_duplicates(["passage", "position"]).itertuples():
        p, t = row.passage, row.position
        native_write = factors["beta"][p, t] * torch.outer(factors["k"][p, t], factors["v"][p, t])
        resid = as_tail_input(model(tokens[p : p + 1, : t + 2], stop_at_layer=layer), dtype)  # entering the layer

        def step(cache):  # one decoding step at t + 1 from the layer on
            return torch.log_softmax(tail(resid[:, t + 1 :], start_at_layer=layer, cache=cache)[0, -1].float(), -1)

        cache = tail.empty_cache()
        tail(resid[:, : t + 1], start_at_layer=layer, stop_at_layer=model.cfg.n_layers, cache=cache)
        native = step(copy.deepcopy(cache))
        kls = []
        for edit in (row.coefficient * atoms[row.atom] - native_write, -native_write):
            edited_cache = copy.deepcopy(cache)
            edited_cache.layers[layer]["state"][0, head] += edit
            logp = step(edited_cache)
            kls.append(float((native.exp() * (native - logp)).sum()))
        # the random condition costs the same third copy and step
        step(copy.deepcopy(cache))
        out.append((p, t, *kls))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["qwen35-tiny", *sorted(SHAPES)], default="qwen35-tiny",
                        help="qwen35-tiny: the shipped trained model (held-out text); others: random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--passages", type=int, default=4)
    parser.add_argument("--pos", type=int, default=512)
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--head", type=int, default=2)
    parser.add_argument("--firings", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=192, help="rows per batch (replacement_test's default)")
    parser.add_argument("--naive-firings", type=int, default=40, help="firings timed for the straightforward protocol")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5, help="paired timed runs of both protocols (medians)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build_model(args.shape, args.device, dtype)
    if args.shape == "qwen35-tiny":
        from writesae_lens import pipeline

        tokens = pipeline.token_passages(model, pipeline.load_texts(None), args.passages, args.pos)
    else:
        tokens = torch.randint(0, model.cfg.d_vocab, (args.passages, args.pos), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(args.device)
    sae = firing_sae(model, tokens, args.layer, args.head, d_sae=256, k=16)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    replacement_test(model, sae, args.layer, args.head, tokens[:1], max_firings=4, progress=False)  # warm-up
    sync()

    peaks: dict[str, Peak] = {}

    def timed(run, name: str):
        """(seconds, result) of one run, the device synchronised; its peak memory joins ``peaks[name]``."""
        with peak_memory(args.device) as peak:
            start = time.perf_counter()
            result = run()
            sync()
            seconds = time.perf_counter() - start
        if name not in peaks or peak.peak > peaks[name].peak:
            peaks[name] = peak
        return seconds, result

    def fast_run():
        return replacement_test(model, sae, args.layer, args.head, tokens, max_firings=args.firings,
                                max_firings_per_feature=None, batch_size=args.batch_size, progress=False)

    records = fast_run()
    n_firings = len(records.drop_duplicates(["passage", "position"]))
    distinct = records.drop_duplicates(["passage", "position"])
    # evenly spread over the passages and positions (the straightforward protocol's cost grows with the position)
    subset = distinct.iloc[np.unique(np.linspace(0, len(distinct) - 1, min(args.naive_firings, len(distinct))).round()
                                     .astype(int))]
    # The two are timed alternately, --repeats times, and the ratio is the median of the per-repeat ratios: the
    # machines are shared, and load then hits both alike.
    pairs = []
    for _ in range(args.repeats):
        fast_seconds, _ = timed(fast_run, "fast")
        naive_seconds, naive = timed(lambda: straightforward_protocol(model, sae, args.layer, args.head, tokens,
                                                                      subset), "naive")
        pairs.append((n_firings / fast_seconds, len(naive) / naive_seconds))
    fast = statistics.median(f for f, _ in pairs)
    slow = statistics.median(n for _, n in pairs)
    ratio = statistics.median(f / n for f, n in pairs)

    with torch.no_grad():
        forward = statistics.median(timed(lambda: model(tokens), "forward")[0] for _ in range(args.repeats))
    bound = n_firings / slow / forward

    by_cell = {(r.passage, r.position): (r.kl_atom, r.kl_delete) for r in records.itertuples()}
    diff = max(max(abs(a - by_cell[(p, t)][0]), abs(d - by_cell[(p, t)][1])) for p, t, a, d in naive)
    print(f"model {args.shape} on {args.device} ({args.dtype}); {len(records)} firings at {n_firings} distinct "
          f"positions of {args.passages} passages x {args.pos} tokens. Rates count distinct positions (firings at one "
          f"position share one test; the authors' code repeats it per firing, so counting firings would favour us)")
    print(f"replacement_test: {fast:.1f} firings/s; straightforward protocol: {slow:.2f} firings/s -> "
          f"ratio {ratio:.1f}x (median of {args.repeats} paired runs; goal >= 20x on CPU)")
    print(f"one forward pass over the passages: {forward * 1e3:.0f} ms -> bound for an exact method that runs each "
          f"passage once: {bound:.1f}x; replacement_test reaches {ratio / bound:.0%} of it")
    where = "peak allocated" if args.device.startswith("cuda") else "peak resident set"
    print(f"memory ({where}; in parentheses what the step added to what the process held when it started): "
          f"replacement_test {peaks['fast']}, straightforward protocol {peaks['naive']}, forward pass "
          f"{peaks['forward']}")
    print(f"max |KL difference| between the two on {len(naive)} firings: {diff:.2e}")


if __name__ == "__main__":
    main()
