"""``HookedMamba2``: transformers ``Mamba2ForCausalLM`` checkpoints as a transformer_lens HookedRootModule.

    model = HookedMamba2.from_pretrained("path/to/mamba2-checkpoint")        # or a hub id when online
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "mixer.hook_write" in n)

The forward pass is the project's own pure-torch code with the same write interface as HookedQwen35 (the state of
a head is ``[d_state, head_dim]``, the transpose of transformers' cached ``[head_dim, d_state]``); transformers reads
configs and tokenizers and is the parity oracle in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from writesae_lens.hooking.components import Embed, RMSNorm, Unembed
from writesae_lens.hooking.loading import convert_state_dict
from writesae_lens.hooking.root import HookedRecurrentLM
from writesae_lens.splicing.mixin import HookedSAEMixin

from .config import HookedMamba2Config, check_model_type
from .layers import Mamba2Block
from .weights import our_name


class _Unembed(Unembed):
    """As transformers' ``lm_head``: the (possibly fp32) final residual is cast to the weights' dtype first."""

    def forward(self, x: Tensor) -> Tensor:  # [batch, pos, d_model] -> [batch, pos, d_vocab]
        return F.linear(x.to(self.weight.dtype), self.weight)


class HookedMamba2(HookedSAEMixin, HookedRecurrentLM):
    """Hooks: ``hook_embed``; per block ``blocks.{l}.hook_resid_pre|hook_mixer_out|hook_resid_post``,
    ``blocks.{l}.ln1.hook_scale|hook_normalized`` and the mixer's ``blocks.{l}.mixer.*`` (the write interface plus
    ``hook_skip``, ``hook_ssm_out``, ``hook_gate``); ``ln_final.hook_scale|hook_normalized``. See docs/hooks.md."""

    def __init__(self, cfg: HookedMamba2Config, tokenizer=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList([Mamba2Block(cfg, layer) for layer in range(cfg.n_layers)])
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps)
        self.unembed = _Unembed(cfg.d_model, cfg.d_vocab)
        self.setup()

    def final_norm_gain(self):
        """The weight [d_model] ``ln_final`` multiplies the normalised stream by."""
        return self.ln_final.w

    # ------------------------------------------------------------------ loading
    @classmethod
    def _check_folder(cls, folder: Path) -> None:
        _check_config_file(folder)

    @classmethod
    def _check_hf_config(cls, hf_config) -> None:
        check_model_type(hf_config)

    @classmethod
    def _from_config_and_weights(cls, hf_config, hf_state, device, dtype, tokenizer) -> "HookedMamba2":
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg = HookedMamba2Config.from_hf_config(hf_config, device=device, dtype=dtype)
        if tokenizer is not None:
            cfg.default_prepend_bos = _tokenizer_adds_bos(tokenizer)
        with torch.device("meta"):
            model = cls(cfg, tokenizer)
        weights = convert_state_dict(hf_state, model.state_dict(), our_name, cfg.tie_word_embeddings, "Mamba-2")
        model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
        return model.to(device)


def _tokenizer_adds_bos(tokenizer) -> bool:
    """Prepend BOS by default exactly when the checkpoint's tokenizer adds it itself (Mistral-style tokenizers do,
    GPT-NeoX-style ones used by the original Mamba-2 models do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


def _check_config_file(folder: Path) -> None:
    """Name the supported format before transformers fails on a config it cannot read."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {folder}; pass a transformers Mamba-2 checkpoint folder")
    if "model_type" not in json.loads(config_file.read_text()):
        raise ValueError(
            f"{config_file} has no model_type: HookedMamba2 loads transformers-format checkpoints "
            "(model_type 'mamba2'); original mamba_ssm checkpoints must be converted to that format first"
        )

