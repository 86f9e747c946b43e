"""Speed of HookedQwen35 against transformers on the same weights, as ratios measured in one run (CPU by default).

    python bench/bench_qwen35.py                 # all three figures, a few minutes on 2 cores
    python bench/bench_qwen35.py --repeats 10

1. hook-free forward, HookedQwen35 / Qwen3_5ForCausalLM, batch 4 x 256 tokens of a tiny config (goal <= 1.0);
2. forward with a ``hook_state`` listener / hook-free forward (goal <= 3x);
3. generation, time per token at context 1024 / at context 64, in a GDN-only model (goal <= 1.2: flat).

Times are medians over repeats after a warm-up; machines are noisy, so only the ratios mean something.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from qwen35_factory import randomise  # noqa: E402
from timing import decoder, median_time  # noqa: E402  (bench/ is on sys.path when a script runs)

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
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = HookedQwen35.from_pretrained(folder).eval()
    return hf, ours


@torch.inference_mode()
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
    t_hf = median_time(lambda: hf(tokens, use_cache=False), args.repeats)
    t_ours = median_time(lambda: ours(tokens), args.repeats)
    print(f"[1] hook-free forward {args.batch}x{args.seq}: transformers {t_hf * 1e3:.1f} ms, HookedQwen35 "
          f"{t_ours * 1e3:.1f} ms -> ratio {t_ours / t_hf:.2f} (goal <= 1.0)")

    state_hooks = [(f"blocks.{layer}.mixer.hook_state", lambda x, hook: None) for layer in ours.cfg.recurrent_layers]
    t_states = median_time(lambda: ours.run_with_hooks(tokens, fwd_hooks=state_hooks), args.repeats)
    print(f"[2] forward with hook_state listeners on all {len(state_hooks)} GDN layers: {t_states * 1e3:.1f} ms -> "
          f"ratio {t_states / t_ours:.2f} vs hook-free (goal <= 3)")

    _, gdn_only = tiny_models(["linear_attention"] * 4)

    def per_token(context: int, steps: int = 32) -> float:
        return median_time(decoder(gdn_only, context, steps), args.repeats) / steps

    short, long = per_token(64), per_token(1024)
    print(f"[3] GDN-only decoding per token: context 64 {short * 1e3:.2f} ms, context 1024 {long * 1e3:.2f} ms -> "
          f"ratio {long / short:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
