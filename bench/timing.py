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
