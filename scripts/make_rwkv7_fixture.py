"""Golden fixture for HookedRWKV7: a tiny random fla ``RWKV7ForCausalLM`` checkpoint, its logits and final recurrent
states, written to ``tests/fixtures/rwkv7/``.

fla needs triton, and installing triton next to fla in the project's environment breaks transformers' Qwen3.5 and
Mamba-2 on CPU (docs: ecosystem facts). Run this script from a separate environment instead, e.g.

    python3 -m venv /tmp/fla-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/fla-venv/lib/python3.11/site-packages/main_venv.pth
    pip download --no-deps flash-linear-attention fla-core triton -d /tmp/fla_dl
    /tmp/fla-venv/bin/pip install --no-deps /tmp/fla_dl/*.whl
    TRITON_INTERPRET=1 /tmp/fla-venv/bin/python scripts/make_rwkv7_fixture.py

(the .pth line reuses torch, transformers and einops of the project's environment without changing it). On CPU,
TRITON_INTERPRET=1 runs fla's recurrent kernels (the RWKV-7 layer uses them for < 64 tokens without grad); the
autotuner has no benchmarker there, so only the first config of each kernel is kept.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "rwkv7"
N_POS, SPLIT = 20, 13  # one call of N_POS tokens; and SPLIT tokens then the rest, continuing from fla's cache


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        sys.exit("set TRITON_INTERPRET=1 to run fla's kernels on CPU")
    import triton
    from triton.runtime.autotuner import Autotuner

    Autotuner.prune_configs = lambda self, kwargs, *args: self.configs[:1]  # no benchmarker under TRITON_INTERPRET
    import fla
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    config = RWKV7Config(hidden_size=64, head_dim=16, num_hidden_layers=3, vocab_size=97,
                         decay_low_rank_dim=8, gate_low_rank_dim=16, a_low_rank_dim=8, v_low_rank_dim=8,
                         intermediate_size=96, fuse_cross_entropy=False)  # value_dim != hidden_size fails in fla's init
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(config).eval()
    with torch.no_grad():  # fla zero-initialises o_proj and the channel-mix output: perturb every weight
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1))
    tokens = torch.randint(0, config.vocab_size, (2, N_POS), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(tokens, use_cache=True)
        cache = out.past_key_values
        first = model(tokens[:, :SPLIT], use_cache=True)
        rest = model(tokens[:, SPLIT:], past_key_values=first.past_key_values, use_cache=True)  # fla's kwarg
    states = torch.stack([cache[layer]["recurrent_state"] for layer in range(config.num_hidden_layers)], dim=1)
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT / "checkpoint")
    torch.save({
        "tokens": tokens,
        "logits": out.logits.float(),  # [batch, pos, vocab]
        "states": states.float(),  # [batch, layer, head, d_k, d_v]
        "split": SPLIT,
        "split_logits": torch.cat([first.logits, rest.logits], dim=1).float(),
    }, OUT / "golden.pt")
    (OUT / "provenance.json").write_text(json.dumps({
        "fla": fla.__version__, "triton": triton.__version__, "torch": torch.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "script": "scripts/make_rwkv7_fixture.py",
    }, indent=1) + "\n")
    print("wrote", OUT, "logits", tuple(out.logits.shape), "states", tuple(states.shape))


if __name__ == "__main__":
    main()
