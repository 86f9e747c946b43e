"""Cost of gradients through the state (attribution patching), as ratios measured in one run, on all three families.

    python bench/bench_gradients.py                       # tiny shapes, about a minute on one thread
    python bench/bench_gradients.py --shape real          # one layer shape of each released model (minutes)
    python bench/bench_gradients.py --families mamba2 --repeats 10 --threads 2

For each family: forward + ``loss.backward()`` with a hook on every ``hook_state`` that takes a gradient (``x + a_l``,
one zero scalar ``a_l`` per layer with ``requires_grad``; the backward computes ``d loss / d S_t`` at every state
through the adjoint recurrence, ``writesae_lens.ops.adjoint``) against the plain forward + ``loss.backward()`` of the
parameters. Both sides build the parameters' gradients; the ratio is what the state gradients add.

Shapes (``--shape``): ``tiny`` is each family's benchmark toy (Qwen3.5: 3 Gated DeltaNet layers of 4 heads 32 x 32
and one attention layer, d_model 128; Mamba-2: ``bench_mamba2.py --shape tiny``; RWKV-7: 4 heads 16 x 24, d_model
64). ``real`` is one layer shape of the released models, ``--layers`` deep: Mamba-2-130m (``bench_mamba2.py``),
RWKV-7 0.1B (``bench_rwkv7.py``), and Qwen3.5-0.8B's Gated DeltaNet (16 value heads of 128 x 128, 16 key heads,
d_model 1024; recurrent layers only, vocabulary 8192).

Times are medians over repeats after a warm-up; the two sides are timed alternately and the ratio is the median of
the per-repeat ratios (``bench/timing.py``). Only the ratios mean something.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from timing import paired_times  # noqa: E402  (bench/ is on sys.path when a script runs)

FAMILIES = ("qwen35", "mamba2", "rwkv7")


def build(family: str, shape: str, layers: int):
    """A random model of the family at the shape, in float32."""
    if family == "mamba2":
        from bench_mamba2 import build_models

        return build_models("tiny" if shape == "tiny" else "mamba2-130m", layers)[1]
    if family == "rwkv7":
        if shape == "tiny":
            from rwkv7_factory import random_rwkv7

            return random_rwkv7(512, n_layers=layers)
        from bench_rwkv7 import build_model

        return build_model(layers)
    if shape == "tiny":
        from bench_qwen35 import tiny_models

        return tiny_models(["linear_attention"] * (layers - 1) + ["full_attention"])[1]
    return _qwen35_08b_gdn(layers)


def _qwen35_08b_gdn(layers: int):
    from qwen35_factory import randomise
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from writesae_lens.adapters.qwen35 import HookedQwen35

    config = Qwen3_5TextConfig(
        vocab_size=8192, hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers,
        layer_types=["linear_attention"] * layers, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16,
    )
    torch.manual_seed(0)
    hf = Qwen3_5ForCausalLM(config).eval()
    randomise(hf, 0)
    return HookedQwen35.from_hf_model(hf).eval()


def measure(model, tokens: torch.Tensor, repeats: int) -> tuple[float, float, float]:
    """(seconds with state gradients, seconds plain, median ratio)."""
    layers = [i for i, block in enumerate(model.blocks) if hasattr(block, "mixer")]
    shifts = {i: torch.zeros((), requires_grad=True) for i in layers}
    hooks = [(f"blocks.{i}.mixer.hook_state", lambda x, hook, a=shifts[i]: x + a) for i in layers]

    def plain():
        model.zero_grad(set_to_none=True)
        model(tokens, return_type="loss").backward()

    def with_states():
        model.zero_grad(set_to_none=True)
        with model.hooks(fwd_hooks=hooks):
            model(tokens, return_type="loss").backward()
        assert all(a.grad is not None for a in shifts.values())
        for a in shifts.values():
            a.grad = None

    return paired_times(with_states, plain, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--shape", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"shape {args.shape}, {args.layers} layers, batch {args.batch} x {args.seq} tokens, {args.threads} thread(s)")
    for family in args.families:
        model = build(family, args.shape, args.layers)
        cfg = model.cfg
        tokens = torch.randint(0, cfg.d_vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        t_states, t_plain, ratio = measure(model, tokens, args.repeats)
        print(f"{family}: {len(cfg.recurrent_layers)} recurrent layers of {cfg.n_heads} heads {cfg.d_k} x {cfg.d_v}, "
              f"d_model {cfg.d_model}: forward + backward with state gradients on every hook_state "
              f"{t_states * 1e3:.0f} ms, plain {t_plain * 1e3:.0f} ms -> ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
