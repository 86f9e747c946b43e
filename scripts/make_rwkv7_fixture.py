"""Golden fixtures for HookedRWKV7: tiny random fla ``RWKV7ForCausalLM`` checkpoints, their logits and final recurrent
states, written to ``tests/fixtures/rwkv7/`` (d_k == d_v) and ``tests/fixtures/rwkv7_nonsquare/`` (value_dim 128 =
2 * hidden_size, so d_k = 16 and d_v = 32).

fla needs triton, and installing triton next to fla in the project's environment breaks transformers' Qwen3.5 and
Mamba-2 on CPU (docs: ecosystem facts). Run this script from a separate environment instead, e.g.

    python3 -m venv /tmp/fla-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/fla-venv/lib/python3.11/site-packages/main_venv.pth
    pip download --no-deps flash-linear-attention fla-core triton -d /tmp/fla_dl
    /tmp/fla-venv/bin/pip install --no-deps /tmp/fla_dl/*.whl
    TRITON_INTERPRET=1 /tmp/fla-venv/bin/python scripts/make_rwkv7_fixture.py [--fixture square|nonsquare|all]

(the .pth line reuses torch, transformers and einops of the project's environment without changing it). On CPU,
TRITON_INTERPRET=1 runs fla's recurrent kernels (the RWKV-7 layer uses them for < 64 tokens without grad); the
autotuner has no benchmarker there, so only the first config of each kernel is kept.

fla 0.6.0 and value_dim != hidden_size (the non-square fixture only; the square one runs fla unpatched):
- its config accepts only multiples of hidden_size, hence 128;
- ``RWKV7Attention._initialize_weights`` sets v_lora's bias from a hidden_size-long ramp, which fails on the
  value_dim-long bias: that one step is skipped (the bias keeps LoRA's own init, then gets the same random
  perturbation as every weight);
- the fused ``gate_output_correction`` kernel indexes v and the output with head_dim (d_k), so it leaves half of
  each head's output unwritten when d_v != d_k: the layer calls fla's own ``gate_output_correction_ref`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

FIXTURES_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
N_POS, SPLIT = 20, 13  # one call of N_POS tokens; and SPLIT tokens then the rest, continuing from fla's cache
FIXTURES = {"square": ("rwkv7", None), "nonsquare": ("rwkv7_nonsquare", 128)}  # name: (folder, value_dim)
NONSQUARE_WORKAROUNDS = [
    "RWKV7Attention._initialize_weights: v_lora.set_bias_value(<hidden_size ramp>) skipped (shape mismatch)",
    "fla.layers.rwkv7.gate_output_correction -> fla.ops.rwkv7.gate_output_correction.gate_output_correction_ref "
    "(the fused kernel assumes d_v == d_k)",
]


def fla_patches_for_nonsquare(stack: ExitStack) -> None:
    import fla.layers.rwkv7
    from fla.layers.rwkv6 import LoRA
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    set_bias_value = LoRA.set_bias_value

    def set_bias_value_or_skip(self, value):
        bias = self.lora[2].bias
        if isinstance(value, torch.Tensor) and bias is not None and value.shape != bias.shape:
            return
        set_bias_value(self, value)

    stack.enter_context(mock.patch.object(LoRA, "set_bias_value", set_bias_value_or_skip))
    stack.enter_context(mock.patch.object(fla.layers.rwkv7, "gate_output_correction", gate_output_correction_ref))


def write_fixture(name: str, out_root: Path) -> None:
    import fla
    import triton
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    value_dim = FIXTURES[name][1]
    extra = {} if value_dim is None else {"value_dim": value_dim}
    config = RWKV7Config(hidden_size=64, head_dim=16, num_hidden_layers=3, vocab_size=97,
                         decay_low_rank_dim=8, gate_low_rank_dim=16, a_low_rank_dim=8, v_low_rank_dim=8,
                         intermediate_size=96, fuse_cross_entropy=False, **extra)
    with ExitStack() as stack:
        if value_dim is not None:
            fla_patches_for_nonsquare(stack)
        torch.manual_seed(0)
        model = RWKV7ForCausalLM(config).eval()
        with torch.no_grad():  # fla zero-initialises o_proj and the channel-mix output: perturb every weight
            gen = torch.Generator().manual_seed(1)
            for _, p in model.named_parameters():
                p.add_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1))
        tokens = torch.randint(0, config.vocab_size, (2, N_POS), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            out = model(tokens, use_cache=True)
            cache = out.past_key_values
            first = model(tokens[:, :SPLIT], use_cache=True)
            rest = model(tokens[:, SPLIT:], past_key_values=first.past_key_values, use_cache=True)  # fla's kwarg
    states = torch.stack([cache[layer]["recurrent_state"] for layer in range(config.num_hidden_layers)], dim=1)
    out_dir = out_root / FIXTURES[name][0]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir / "checkpoint")
    torch.save({
        "tokens": tokens,
        "logits": out.logits.float(),  # [batch, pos, vocab]
        "states": states.float(),  # [batch, layer, head, d_k, d_v]
        "split": SPLIT,
        "split_logits": torch.cat([first.logits, rest.logits], dim=1).float(),
    }, out_dir / "golden.pt")
    provenance = {
        "fla": fla.__version__, "triton": triton.__version__, "torch": torch.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "script": "scripts/make_rwkv7_fixture.py",
    }
    if value_dim is not None:  # the square fixture's provenance keeps its original keys
        provenance.update({"command": f"scripts/make_rwkv7_fixture.py --fixture {name}", "value_dim": value_dim,
                           "d_k": config.head_dim, "d_v": value_dim // config.num_heads,
                           "fla_workarounds": NONSQUARE_WORKAROUNDS})
    (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print("wrote", out_dir, "logits", tuple(out.logits.shape), "states", tuple(states.shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", choices=[*FIXTURES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=FIXTURES_DIR, help="folder that receives the fixture folders")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        sys.exit("set TRITON_INTERPRET=1 to run fla's kernels on CPU")
    from triton.runtime.autotuner import Autotuner

    Autotuner.prune_configs = lambda self, kwargs, *args: self.configs[:1]  # no benchmarker under TRITON_INTERPRET
    for name in FIXTURES if args.fixture == "all" else [args.fixture]:
        write_fixture(name, args.out)


if __name__ == "__main__":
    main()
