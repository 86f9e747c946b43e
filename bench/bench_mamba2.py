"""Speed of HookedMamba2 against transformers on the same weights, as ratios measured in one run (CPU by default).

    python bench/bench_mamba2.py                       # the mamba2-130m layer shape, a few minutes on one thread
    python bench/bench_mamba2.py --shape tiny          # the tiny config, under a minute
    python bench/bench_mamba2.py --repeats 10 --threads 2

1. hook-free forward, HookedMamba2 / Mamba2ForCausalLM, batch 4 x 256 tokens (goal <= 1.0);
2. forward with ``hook_state`` listeners on every layer / hook-free forward (goal <= 3x), under ``torch.no_grad``
   (how SAELens collects activations) and under ``torch.inference_mode`` (how ``generate`` runs);
3. decoding, time per token at context 1024 / at context 64 (goal <= 1.2: O(1) per token).

Shapes (``--shape``). The default, ``mamba2-130m``, is one layer of the released Mamba-2-130m (d_model 768, expand 2,
24 heads of head_dim 64, d_state 128, one group, conv 4, chunk 256), stacked ``--layers`` deep (4 by default) with
the vocabulary scaled by ``layers / 24`` (``--layers 24`` gives the real 50288) so that the unembedding weighs in the
forward as much as in the real model: the ratios users see are those of a real shape. ``tiny`` (4 layers, d_model
128, 8 heads of head_dim 32 in 2 groups, d_state 64, vocab 512) has about 2.4x more state per FLOP than the real
model, so item 2 is much harsher there; it stays available for quick runs.

One thread by default because the machine is shared. Times are medians over repeats after a warm-up; the two sides
of each ratio are timed alternately and the ratio is the median of the per-repeat ratios. Only the ratios mean
something.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mamba2_factory import randomise  # noqa: E402
from timing import paired_times, report_decoding, report_listener_cost  # noqa: E402  (bench/ is on sys.path when a script runs)

from writesae_lens.adapters.mamba2 import HookedMamba2  # noqa: E402


REAL_130M_LAYERS, REAL_130M_VOCAB = 24, 50288
SHAPES = {
    "tiny": dict(hidden_size=128, expand=2, num_heads=8, head_dim=32, n_groups=2, state_size=64, conv_kernel=4,
                 chunk_size=64),
    "mamba2-130m": dict(hidden_size=768, expand=2, num_heads=24, head_dim=64, n_groups=1, state_size=128,
                        conv_kernel=4, chunk_size=256),
}


def vocab_for(shape: str, layers: int) -> int:
    if shape == "tiny":
        return 512
    return -(-REAL_130M_VOCAB * layers // REAL_130M_LAYERS // 8) * 8  # scaled with the depth, a multiple of 8


def build_models(shape: str, layers: int):
    """transformers' Mamba2ForCausalLM with random weights, and HookedMamba2 on the same weights."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(vocab_size=vocab_for(shape, layers), num_hidden_layers=layers, **SHAPES[shape])
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(config).eval()
    randomise(hf, 0)
    return hf, HookedMamba2.from_hf_model(hf).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mamba2-130m")
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf, ours = build_models(args.shape, args.layers)
    vocab = ours.cfg.d_vocab
    print(f"shape {args.shape}: {args.layers} layers, d_model {ours.cfg.d_model}, {ours.cfg.n_heads} heads, "
          f"d_k {ours.cfg.d_k}, d_v {ours.cfg.d_v}, vocab {vocab}; {args.threads} thread(s)")
    tokens = torch.randint(0, vocab, (args.batch, args.seq))
    with torch.inference_mode():
        t_ours, t_hf, ratio = paired_times(lambda: ours(tokens), lambda: hf(tokens, use_cache=False), args.repeats)
    print(f"[1] hook-free forward {args.batch}x{args.seq}: transformers {t_hf * 1e3:.1f} ms, HookedMamba2 "
          f"{t_ours * 1e3:.1f} ms -> ratio {ratio:.2f} (goal <= 1.0)")

    report_listener_cost(ours, tokens, args.repeats, "[2]")
    report_decoding(ours, args.repeats, "[3]")


if __name__ == "__main__":
    main()
