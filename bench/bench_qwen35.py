"""Speed of HookedQwen35 against transformers on the same weights, as ratios measured in one run (CPU by default).

    python bench/bench_qwen35.py                 # all three figures, a few minutes on 2 cores
    python bench/bench_qwen35.py --repeats 10

1. hook-free forward, HookedQwen35 / Qwen3_5ForCausalLM, batch 4 x 256 tokens of a tiny config (goal <= 1.0);
2. forward with a ``hook_state`` listener / hook-free forward (goal <= 3x);
3. generation, time per token at context 1024 / at context 64, in a GDN-only model (goal <= 1.2: flat).

Times are medians over repeats after a warm-up; the two sides of each ratio are timed alternately and the ratio is the
median of the per-repeat ratios (bench/timing.py). Machines are noisy, so only the ratios mean something.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from qwen35_factory import randomise  # noqa: E402
from timing import paired_times, report_decoding, report_listener_cost  # noqa: E402  (bench/ is on sys.path when a script runs)

from writesae_lens.adapters.qwen35 import HookedQwen35  # noqa: E402


def tiny_models(layer_types, vocab=512):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=len(layer_types),
        layer_types=layer_types, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=4, linear_num_value_heads=4,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    hf = Qwen3_5ForCausalLM(config).eval()
    randomise(hf, 0)
    return hf, HookedQwen35.from_hf_model(hf).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hybrid = ["linear_attention"] * 3 + ["full_attention"]
    hf, ours = tiny_models(hybrid)
    tokens = torch.randint(0, 512, (args.batch, args.seq))
    with torch.inference_mode():
        t_ours, t_hf, ratio = paired_times(lambda: ours(tokens), lambda: hf(tokens, use_cache=False), args.repeats)
    print(f"[1] hook-free forward {args.batch}x{args.seq}: transformers {t_hf * 1e3:.1f} ms, HookedQwen35 "
          f"{t_ours * 1e3:.1f} ms -> ratio {ratio:.2f} (goal <= 1.0)")
    report_listener_cost(ours, tokens, args.repeats, "[2]")
    _, gdn_only = tiny_models(["linear_attention"] * 4)
    report_decoding(gdn_only, args.repeats, "[3] GDN-only")

if __name__ == "__main__":
    main()
