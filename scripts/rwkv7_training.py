"""An RWKV-7 for `train_models.py --family rwkv7`: the library's own pure-torch `HookedRWKV7` (checked against fla through the
golden fixtures), built from an fla-style `config.json` mapping, initialised from scratch, and saved as an fla checkpoint
folder (fla's parameter names, `model_type: rwkv7`) that `HookedRWKV7.from_pretrained` / `load_hooked_model` read back.

Initialisation (our choices, in the spirit of the RWKV-7 reference initialisation; nothing is copied):
- token-shift mixes `x_*`: per channel, a ramp from 0 to about 1 whose steepness falls with depth, so lower layers mix
  more of the previous token;
- decay: the bias of `w_lora` (`w0`) runs per key channel of every head from -6.5 to -1.5, so that the per-token retention
  `exp(-exp(-0.5) sigmoid(w0))` spreads from 0.999 (about 2300 tokens to keep 10 %) to 0.90 (about 22 tokens); the
  low-rank paths start at zero input weights and small output weights;
- `k_k = 0.85`, `k_a = 1`, `r_k = 0`; in-lane mix `a` starts at sigmoid(0) = 0.5; value residual (`v_lora`) bias 1;
- r, k, v and the channel-mix key: uniform in +-0.5 / sqrt(d_model); the time-mix output and the channel-mix value
  projections start at zero (each block starts as the identity on the residual stream); embeddings uniform +-1e-4
  (they are layer-normalised), the unembedding normal with std 0.5 / sqrt(d_model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def rwkv7_config(vocab_size: int, bos: int, eos: int, pad: int) -> dict:
    """fla `RWKV7Config` fields of the shipped size: 4 layers, d_model 128, 4 heads of d_k = d_v = 32, channel mix 512."""
    return {
        "model_type": "rwkv7",
        "architectures": ["RWKV7ForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "head_dim": 32,
        "num_heads": 4,
        "value_dim": 128,
        "intermediate_size": 512,
        "hidden_ratio": 4.0,
        "decay_low_rank_dim": 16,
        "gate_low_rank_dim": 32,
        "a_low_rank_dim": 16,
        "v_low_rank_dim": 16,
        "hidden_act": "sqrelu",
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "attn": None,
        "attn_mode": "chunk",
        "fuse_norm": False,
        "use_cache": True,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def build_rwkv7(config: dict, tokenizer, generator: torch.Generator):
    """A `HookedRWKV7` of `config`, initialised as the module docstring says (seeded by `generator`)."""
    from writesae_lens.adapters.rwkv7 import HookedRWKV7
    from writesae_lens.adapters.rwkv7.config import HookedRWKV7Config

    cfg = HookedRWKV7Config.from_hf_config(config)
    model = HookedRWKV7(cfg, tokenizer)
    initialise(model, generator)
    return model


def _uniform(shape, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


@torch.no_grad()
def initialise(model, generator: torch.Generator) -> None:
    cfg = model.cfg
    d, n_layers = cfg.d_model, cfg.n_layers
    channel = torch.arange(d, dtype=torch.float64) / d  # [d] in [0, 1)
    bound = 0.5 / math.sqrt(d)
    model.embed.W_E.copy_(_uniform(model.embed.W_E.shape, 1e-4, generator))
    model.unembed.weight.copy_(torch.randn(model.unembed.weight.shape, generator=generator) * 0.5 / math.sqrt(d))
    for norm in [model.embed.ln0, model.ln_final] + [m for b in model.blocks for m in (b.ln1, b.ln2)]:
        norm.weight.fill_(1.0)
        if norm.bias is not None:
            norm.bias.zero_()
    for layer, block in enumerate(model.blocks):
        depth = layer / max(1, n_layers - 1)  # 0 at the first layer, 1 at the last
        mixer = block.mixer
        keep = 1.0 - depth * 0.9  # steepness of the mix ramps
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(mixer, name).copy_((1.0 - channel ** (power * keep)).view(1, 1, d))
        block.mlp.x_k.copy_(1.0 - channel ** keep)
        within_head = torch.arange(cfg.d_k, dtype=torch.float64) / max(1, cfg.d_k - 1)  # [d_k]
        w0 = (-6.5 + 5.0 * within_head ** (0.85 + depth ** 0.5)).repeat(cfg.n_heads)  # [key_dim]
        for lora, out_bias in ((mixer.w_lora, w0), (mixer.a_lora, torch.zeros(cfg.key_dim)),
                               (getattr(mixer, "v_lora", None), torch.ones(cfg.value_dim)), (mixer.g_lora, None)):
            if lora is None:
                continue
            first, last = lora.lora[0], lora.lora[2]
            first.weight.zero_() if out_bias is not None else first.weight.copy_(
                _uniform(first.weight.shape, bound, generator))
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.1 / math.sqrt(last.weight.shape[1]))
            if out_bias is not None:
                last.bias.copy_(out_bias)
        mixer.k_k.fill_(0.85)
        mixer.k_a.fill_(1.0)
        mixer.r_k.zero_()
        for proj in (mixer.r_proj, mixer.k_proj, mixer.v_proj, block.mlp.key):
            proj.weight.copy_(_uniform(proj.weight.shape, bound, generator))
        mixer.o_proj.weight.zero_()
        block.mlp.value.weight.zero_()
        mixer.g_norm.weight.fill_(1.0)
        mixer.g_norm.bias.zero_()


def fla_name(name: str) -> str:
    """The fla parameter name of a `HookedRWKV7` parameter (the inverse of adapters/rwkv7/weights.py's table)."""
    import re

    fixed = {"embed.W_E": "model.embeddings.weight", "unembed.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    for pattern, target in (
        (r"embed\.ln0\.(weight|bias)", r"model.layers.0.pre_norm.\1"),
        (r"ln_final\.(weight|bias)", r"model.norm.\1"),
        (r"blocks\.(\d+)\.ln1\.(weight|bias)", r"model.layers.\1.attn_norm.\2"),
        (r"blocks\.(\d+)\.ln2\.(weight|bias)", r"model.layers.\1.ffn_norm.\2"),
        (r"blocks\.(\d+)\.mixer\.(.+)", r"model.layers.\1.attn.\2"),
        (r"blocks\.(\d+)\.mlp\.(.+)", r"model.layers.\1.ffn.\2"),
    ):
        if re.fullmatch(pattern, name):
            return re.sub(pattern, target, name)
    raise KeyError(f"no fla name for the HookedRWKV7 parameter {name!r}")


def save_rwkv7(model, config: dict, out: Path) -> None:
    """`config.json` + `model.safetensors` (fla names, fp32) in `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {fla_name(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
