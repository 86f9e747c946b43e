"""Speed of HookedMamba2 against transformers on the same weights, as ratios measured in one run (CPU by default).

    python bench/bench_mamba2.py                 # under a minute on one thread
    python bench/bench_mamba2.py --repeats 10 --threads 2

1. hook-free forward, HookedMamba2 / Mamba2ForCausalLM, batch 4 x 256 tokens of a tiny config (goal <= 1.0);
2. forward with ``hook_state`` listeners on every layer / hook-free forward (goal <= 3x), under ``torch.no_grad``
   (how SAELens collects activations) and under ``torch.inference_mode`` (where the library keeps a copy of the
   states to detect in-place edits);
3. decoding, time per token at context 1024 / at context 64 (goal <= 1.2: O(1) per token).

One thread by default because the machine is shared. Times are medians over repeats after a warm-up; the two sides
of each ratio are timed alternately and the ratio is the median of the per-repeat ratios. Only the ratios mean
something.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mamba2_factory import randomise  # noqa: E402

from writesae_lens.adapters.mamba2 import HookedMamba2  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(_timed(fn) for _ in range(repeats))


def paired_times(fn_a, fn_b, repeats: int) -> tuple[float, float, float]:
    """Median times of a and b, and the median of the per-repeat ratios a / b. The two are timed alternately, so
    load from other processes on a shared machine hits both alike."""
    fn_a(), fn_b()  # warm-up
    pairs = [(_timed(fn_a), _timed(fn_b)) for _ in range(repeats)]
    a, b = zip(*pairs)
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in pairs)


def tiny_models(vocab: int = 512):
    """4 layers, d_model 128, 8 heads of head_dim 32 in 2 groups, d_state 64."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(
        vocab_size=vocab, hidden_size=128, expand=2, num_heads=8, head_dim=32, n_groups=2, state_size=64,
        num_hidden_layers=4, conv_kernel=4, chunk_size=64,
    )
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(config).eval()
    randomise(hf, 0)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = HookedMamba2.from_pretrained(folder).eval()
    return hf, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf, ours = tiny_models()
    tokens = torch.randint(0, 512, (args.batch, args.seq))
    with torch.inference_mode():
        t_ours, t_hf, ratio = paired_times(lambda: ours(tokens), lambda: hf(tokens, use_cache=False), args.repeats)
    print(f"[1] hook-free forward {args.batch}x{args.seq}: transformers {t_hf * 1e3:.1f} ms, HookedMamba2 "
          f"{t_ours * 1e3:.1f} ms -> ratio {ratio:.2f} (goal <= 1.0)")

    state_hooks = [(f"blocks.{layer}.mixer.hook_state", lambda x, hook: None) for layer in range(ours.cfg.n_layers)]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            t_states, t_free, ratio = paired_times(
                lambda: ours.run_with_hooks(tokens, fwd_hooks=state_hooks), lambda: ours(tokens), args.repeats
            )
        print(f"[2] {mode.__name__}: forward with hook_state listeners on all {len(state_hooks)} layers "
              f"{t_states * 1e3:.1f} ms, hook-free {t_free * 1e3:.1f} ms -> ratio {ratio:.2f} (goal <= 3)")

    def decoder(context: int, steps: int = 32):
        """A function that decodes ``steps`` tokens after a prompt of ``context`` tokens (from a copy of its cache)."""
        prompt = torch.randint(0, 512, (1, context))
        cache = ours.empty_cache()
        ours(prompt, cache=cache)
        token = prompt[:, -1:]

        def decode():
            branch = cache.copy()
            for _ in range(steps):
                ours(token, cache=branch)

        return decode

    steps = 32
    with torch.inference_mode():
        long, short, ratio = paired_times(decoder(1024, steps), decoder(64, steps), args.repeats)
    print(f"[3] decoding per token: context 64 {short / steps * 1e3:.2f} ms, context 1024 {long / steps * 1e3:.2f} ms "
          f"-> ratio {ratio:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
