"""``HookedRWKV7``: flash-linear-attention ``RWKV7ForCausalLM`` checkpoints (model_type ``rwkv7``) as a
transformer_lens HookedRootModule, in pure torch (fla itself needs triton; it is the parity oracle of the golden
fixture, ``scripts/make_rwkv7_fixture.py``).

    model = HookedRWKV7.from_pretrained("path/to/rwkv7-checkpoint")
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: "mixer.hook_" in n)

``hook_embed`` is the embedding after layer 0's ``pre_norm`` (fla normalises the embeddings once before the first
block), so ``hook_embed == blocks.0.hook_resid_pre`` as in every family. Layers after the first read layer 0's value
(v-first): a run with ``start_at_layer > 0`` takes it as ``v_first=`` (``carried_streams`` names its hook).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from writesae_lens.hooking.components import Unembed
from writesae_lens.hooking.loading import (
    convert_state_dict,
    load_checkpoint_tensors,
    resolve_device,
    resolve_dtype_arguments,
    resolve_folder,
    try_load_tokenizer,
)
from writesae_lens.hooking.root import HookedRecurrentLM
from writesae_lens.splicing.mixin import HookedSAEMixin
from writesae_lens.ops.precision import upcast

from .config import HookedRWKV7Config, check_model_type
from .layers import LayerNorm, RWKV7Block, VFirst
from .weights import our_name


class NormedEmbed(nn.Module):
    """``pre_norm(W_E[tokens])``: fla's layer-0 ``pre_norm`` applied to the embeddings."""

    def __init__(self, cfg: HookedRWKV7Config) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.ln0 = LayerNorm(cfg.d_model, cfg.eps, cfg.norm_bias)

    def forward(self, tokens: Tensor) -> Tensor:  # [batch, pos] -> [batch, pos, d_model]
        return self.ln0(F.embedding(tokens, self.W_E))


class HookedRWKV7(HookedSAEMixin, HookedRecurrentLM):
    """Hooks: ``hook_embed``; per block ``blocks.{l}.hook_resid_pre|hook_mixer_out|hook_resid_mid|hook_mlp_out|
    hook_resid_post``, ``blocks.{l}.ln1|ln2.hook_scale|hook_normalized``, ``blocks.{l}.mlp.hook_pre|hook_post`` and the
    mixer's ``blocks.{l}.mixer.*`` (the DPLR write interface plus ``hook_v_first`` (layer 0), ``hook_bonus``,
    ``hook_gate``); ``ln_final.hook_scale|hook_normalized``."""

    def __init__(self, cfg: HookedRWKV7Config, tokenizer=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self._v_first = VFirst()
        self.embed = NormedEmbed(cfg)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList([RWKV7Block(cfg, layer, self._v_first) for layer in range(cfg.n_layers)])
        self.ln_final = LayerNorm(cfg.d_model, cfg.eps, cfg.norm_bias)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)
        self.setup()

    carried_streams = {"v_first": "blocks.0.mixer.hook_v_first"}

    def forward(self, *args, v_first: Tensor | None = None, **kwargs):
        """As ``HookedRecurrentLM.forward``; with ``start_at_layer > 0`` also pass ``v_first``, layer 0's value for
        the same positions ``[batch, pos, head, d_v]`` (hook ``blocks.0.mixer.hook_v_first``), which every later
        layer reads."""
        start = kwargs.get("start_at_layer")
        if start not in (None, 0):
            resid = args[0] if args else kwargs.get("input")
            expected = (*tuple(resid.shape[:2]), self.cfg.n_heads, self.cfg.d_v) if isinstance(resid, Tensor) else None
            if v_first is None:
                raise ValueError("RWKV-7 layers after the first read layer 0's value (v-first): with start_at_layer > 0 "
                                 "pass v_first=[batch, pos, head, d_v], e.g. cached from 'blocks.0.mixer.hook_v_first'")
            if expected is not None and tuple(v_first.shape) != expected:
                raise ValueError(f"v_first has shape {tuple(v_first.shape)}; expected {expected} [batch, pos, head, d_v]")
        elif v_first is not None:
            raise ValueError("v_first is only taken with start_at_layer > 0 (layer 0 computes it otherwise)")
        self._v_first.value = None if v_first is None else upcast(v_first)
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._v_first.value = None

    def final_norm_gain(self):
        """The weight [d_model] ``ln_final`` multiplies the normalised stream by."""
        return self.ln_final.weight  # its bias adds bias @ W_U to every logit, attributed to no component

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype: torch.dtype | str | None = None, tokenizer=None,
                        load_tokenizer: bool = True, torch_dtype: torch.dtype | str | None = None) -> "HookedRWKV7":
        """Load a local fla RWKV-7 checkpoint folder (``config.json`` with model_type ``rwkv7`` + safetensors) or a hub
        id. The config is read as JSON: transformers' AutoConfig does not know ``rwkv7`` without fla. ``dtype`` /
        ``torch_dtype`` as for every family (default float32)."""
        device, dtype = resolve_device(device), resolve_dtype_arguments(dtype, torch_dtype)  # clear errors
        folder = resolve_folder(name_or_path)  # also: config.json must be JSON
        config_file = Path(folder) / "config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"no config.json in {folder}; pass an fla RWKV-7 checkpoint folder")
        hf_config = json.loads(config_file.read_text())
        cls._check_hf_config(hf_config)
        if tokenizer is None and load_tokenizer:
            tokenizer = try_load_tokenizer(folder)
        model = cls._from_config_and_weights(hf_config, load_checkpoint_tensors(folder), device, dtype, tokenizer)
        model.cfg.model_name = str(name_or_path)
        return model

    @classmethod
    def _check_hf_config(cls, hf_config) -> None:
        check_model_type(SimpleNamespace(**hf_config) if isinstance(hf_config, dict) else hf_config)

    @classmethod
    def _from_config_and_weights(cls, hf_config, hf_state, device, dtype, tokenizer) -> "HookedRWKV7":
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg = HookedRWKV7Config.from_hf_config(hf_config, device=device, dtype=dtype)
        with torch.device("meta"):
            model = cls(cfg, tokenizer)
        weights = convert_state_dict(hf_state, model.state_dict(), our_name, cfg.tie_word_embeddings, "RWKV-7")
        model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
        return model.to(device)
