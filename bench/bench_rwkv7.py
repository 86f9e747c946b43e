"""Speed of HookedRWKV7 as ratios measured in one run (CPU by default).

    python bench/bench_rwkv7.py                  # a couple of minutes on one thread
    python bench/bench_rwkv7.py --repeats 10 --threads 2

1. forward with ``hook_state`` listeners on every layer / hook-free forward, batch 4 x 256 tokens (goal <= 3x), under
   ``torch.no_grad`` (how SAELens collects activations) and under ``torch.inference_mode``;
2. decoding, time per token at context 1024 / at context 64 (goal <= 1.2: O(1) per token);
3. the chunked DPLR op, forward + backward at batch 2 x 1024 tokens of the layer shape (training, gradients through the
   state): the pair products with the decays factored into their two sides (the path taken whenever every chunk's
   cumulative log decay is within +-60, as RWKV-7's own decays always are) against the explicit pairwise exponents
   (the fallback for edited decays of any strength), both with the batched chunk-to-chunk recurrence.

There is no hook-free parity ratio against a reference implementation here, unlike the Mamba-2 and Qwen3.5 benches:
the reference, flash-linear-attention's RWKV7ForCausalLM, runs only through triton kernels, which do not run on CPU
(the golden fixtures of the tests were made with triton's interpreter, far too slow to time).

The model is a random HookedRWKV7 with the layer shape of RWKV-7 0.1B (d_model 768, 12 heads of 64, LoRA ranks
decay 64 / a 64 / v 32 / gate 128, channel mix 3072), ``--layers`` deep (4 by default), with the vocabulary scaled
by ``layers / 12`` from the real 65536 so that the unembedding weighs in the forward as much as in the real model
(``--layers 12`` gives the real vocabulary). Built here, without fla.

One thread by default because the machine is shared. Times are medians over repeats after a warm-up; the two sides
of each ratio are timed alternately and the ratio is the median of the per-repeat ratios. Only the ratios mean
something.
"""

from __future__ import annotations

import argparse

import torch
from timing import paired_times, report_decoding, report_listener_cost  # bench/ is on sys.path when a script runs

import writesae_lens.ops.dplr as dplr

from writesae_lens.adapters.rwkv7 import HookedRWKV7
from writesae_lens.adapters.rwkv7.config import HookedRWKV7Config

REAL_LAYERS, REAL_VOCAB = 12, 65536


def build_model(layers: int, seed: int = 0) -> HookedRWKV7:
    """A random RWKV-7 of the 0.1B layer shape; every weight drawn (no path is zero)."""
    vocab = -(-REAL_VOCAB * layers // REAL_LAYERS // 8) * 8  # scaled with the depth, a multiple of 8
    cfg = HookedRWKV7Config(
        n_layers=layers, d_model=768, d_vocab=vocab, n_heads=12, d_k=64, d_v=64, d_mlp=3072,
        decay_low_rank_dim=64, gate_low_rank_dim=128, a_low_rank_dim=64, v_low_rank_dim=32, eps=1e-5,
        model_name="random-rwkv7-0.1b-shape",
    )
    torch.manual_seed(seed)
    model = HookedRWKV7(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() > 1:  # matrices (unit-scale outputs), token-shift mixes, r_k
                p.copy_(noise * p.shape[-1] ** -0.5)
            elif name.endswith("weight"):  # norm gains
                p.copy_(1 + 0.1 * noise)
            else:  # biases, k_k, k_a
                p.copy_(0.1 * noise)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model(args.layers)
    cfg = model.cfg
    print(f"RWKV-7 0.1B layer shape: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, d_k {cfg.d_k}, "
          f"d_v {cfg.d_v}, vocab {cfg.d_vocab}; {args.threads} thread(s)")
    tokens = torch.randint(0, cfg.d_vocab, (args.batch, args.seq))

    report_listener_cost(model, tokens, args.repeats, "[1]")
    report_decoding(model, args.repeats, "[2]")
    report_dplr_training(cfg, args.repeats, "[3]")


def report_dplr_training(cfg, repeats: int, label: str, batch: int = 2, seq: int = 1024) -> None:
    """Forward + backward of ``dplr_chunked``: factored pair products / pairwise exponents (the fallback)."""
    generator = torch.Generator().manual_seed(0)
    shape = (batch, seq, cfg.n_heads, cfg.d_k)
    erase_key = torch.nn.functional.normalize(torch.randn(shape, generator=generator), dim=-1)
    inputs = [torch.randn(shape, generator=generator), torch.randn(shape, generator=generator),
              torch.randn(batch, seq, cfg.n_heads, cfg.d_v, generator=generator),
              -0.6065 * torch.rand(shape, generator=generator), 0.5 * erase_key, erase_key]

    def step():
        leaves = [x.clone().requires_grad_() for x in inputs]
        reads, final, _ = dplr.dplr_chunked(*leaves)
        (reads.square().mean() + final.square().mean()).backward()

    def pairwise():
        kept, dplr.FACTORED_LOG_RANGE = dplr.FACTORED_LOG_RANGE, 0.0
        try:
            step()
        finally:
            dplr.FACTORED_LOG_RANGE = kept

    factored_s, pairwise_s, ratio = paired_times(step, pairwise, repeats)
    print(f"{label} chunked DPLR forward + backward, {batch} x {seq} tokens, {cfg.n_heads} heads of {cfg.d_k} x "
          f"{cfg.d_v}, chunk {dplr.DEFAULT_CHUNK_SIZE}: factored {factored_s * 1e3:.0f} ms, pairwise "
          f"{pairwise_s * 1e3:.0f} ms -> pairwise / factored {1 / ratio:.2f}x")


if __name__ == "__main__":
    main()
