"""Cost of a WriteSAE TopK training step (forward + backward) with the decode paths of issue #20.

Three variants of the same step, timed in the same run:
  dense   - decode through the materialised atoms (code @ W_dec): the baseline, gradient for every latent;
  full    - the sparse gathered decode whose backward also gives every latent <G, A_i> (what `decode` does outside a
            TopK training step);
  active  - the sparse decode with the code's gradient on the selected entries only (what a TopK / BatchTopK
            training step uses; exact there).
Prints the median time per step and each variant's ratio to `dense`.

    python bench/bench_sae_decode_backward.py --threads 1
"""

import argparse
import statistics
import time

import torch

import writesae_lens.saes as ws
from writesae_lens.saes import factored
from writesae_lens.saes.base import WriteSAEBase


def step_time(sae, states, variant: str, repeats: int) -> float:
    fraction = 0.0 if variant == "dense" else 1e9
    original_fraction = factored.SPARSE_DECODE_MAX_ACTIVE_FRACTION
    factored.SPARSE_DECODE_MAX_ACTIVE_FRACTION = fraction
    times = []
    try:
        for _ in range(repeats + 1):
            sae.zero_grad(set_to_none=True)
            sae._active_code_gradient_only = variant == "active"
            start = time.perf_counter()
            acts, _ = sae.encode_with_hidden_pre(states)
            loss = (sae.decode(acts) - states).pow(2).sum(-1).mean()
            loss.backward()
            times.append(time.perf_counter() - start)
    finally:
        factored.SPARSE_DECODE_MAX_ACTIVE_FRACTION = original_fraction
        sae._active_code_gradient_only = False
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--d-k", type=int, default=32)
    parser.add_argument("--d-v", type=int, default=32)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ws.WriteTopKTrainingSAEConfig(d_in=args.d_k * args.d_v, d_sae=args.d_sae, d_k=args.d_k, d_v=args.d_v,
                                        k=args.k, b_dec_init="zeros")
    sae = ws.WriteTopKTrainingSAE(cfg)
    states = torch.randn(args.batch, args.d_k * args.d_v)
    assert isinstance(sae, WriteSAEBase)
    results = {variant: step_time(sae, states, variant, args.repeats) for variant in ("dense", "full", "active")}
    print(f"d_k={args.d_k} d_v={args.d_v} d_sae={args.d_sae} k={args.k} batch={args.batch} threads={args.threads}")
    for variant, seconds in results.items():
        print(f"{variant:7s} {seconds * 1e3:9.1f} ms/step   ratio to dense {seconds / results['dense']:.2f}")


if __name__ == "__main__":
    main()
