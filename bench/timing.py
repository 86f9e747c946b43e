"""Timing helpers shared by the benchmarks: medians over repeats, paired (alternated) timing, and a decoder.

Only ratios measured in one run mean something on shared machines; timing the two sides of a ratio alternately lets
load from other processes hit both alike.
"""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def paired_times(fn_a, fn_b, repeats: int) -> tuple[float, float, float]:
    """Median times of a and b, and the median of the per-repeat ratios a / b (timed alternately, after a warm-up)."""
    fn_a(), fn_b()
    pairs = [(timed(fn_a), timed(fn_b)) for _ in range(repeats)]
    a, b = zip(*pairs)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in pairs)


def decoder(model, context: int, steps: int = 32):
    """A function that decodes ``steps`` tokens after a random prompt of ``context`` tokens, each time from a copy of
    the prompt's cache (copying a cache copies no tensors)."""
    prompt = torch.randint(0, model.cfg.d_vocab, (1, context))
    cache = model.empty_cache()
    model(prompt, cache=cache)
    token = prompt[:, -1:]

    def decode():
        branch = cache.copy()
        for _ in range(steps):
            model(token, cache=branch)

    return decode


def report_listener_cost(model, tokens, repeats: int, label: str) -> None:
    """Print forward time with a ``hook_state`` listener on every recurrent layer / hook-free, under ``no_grad`` (how
    SAELens collects activations) and ``inference_mode`` (goal <= 3)."""
    state_hooks = [(f"blocks.{layer}.mixer.hook_state", lambda x, hook: None)
                   for layer, block in enumerate(model.blocks) if hasattr(block, "mixer")]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            t_states, t_free, ratio = paired_times(
                lambda: model.run_with_hooks(tokens, fwd_hooks=state_hooks), lambda: model(tokens), repeats
            )
        print(f"{label} {mode.__name__}: forward {tokens.shape[0]}x{tokens.shape[1]} with hook_state listeners on all "
              f"{len(state_hooks)} layers {t_states * 1e3:.1f} ms, hook-free {t_free * 1e3:.1f} ms -> ratio "
              f"{ratio:.2f} (goal <= 3)")


def report_decoding(model, repeats: int, label: str, steps: int = 32) -> None:
    """Print decoding time per token at context 1024 / at context 64 (goal <= 1.2: O(1) per token)."""
    with torch.inference_mode():
        long, short, ratio = paired_times(decoder(model, 1024, steps), decoder(model, 64, steps), repeats)
    print(f"{label} decoding per token: context 64 {short / steps * 1e3:.2f} ms, context 1024 "
          f"{long / steps * 1e3:.2f} ms -> ratio {ratio:.2f} (goal <= 1.2)")
