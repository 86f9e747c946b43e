"""``HookedQwen35``: Qwen3.5-family hybrids (Gated DeltaNet + gated attention) as a transformer_lens HookedRootModule.

    model = HookedQwen35.from_pretrained("path/to/Qwen3.5-0.8B")            # or a hub id when online
    logits, cache = model.run_with_cache("The cat sat", names_filter=lambda n: "mixer.hook_write" in n)

The forward pass is the project's own pure-torch code (hooks sit inside it and stay active while generating);
transformers is used to read configs, weights and tokenizers, and as the parity oracle in the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from writesae_lens.hooking.components import Embed, RMSNorm, Unembed
from writesae_lens.hooking.root import HookedRecurrentLM
from transformer_lens.hook_points import HookPoint

from .config import HookedQwen35Config, text_config_of
from .layers import Qwen35Block
from writesae_lens.hooking.loading import convert_state_dict, load_checkpoint_tensors, resolve_folder, try_load_tokenizer

from .weights import IGNORED_PREFIXES, our_name


class HookedQwen35(HookedRecurrentLM):
    """Hooks: ``hook_embed``; per block those of ``Qwen35Block`` plus ``blocks.{l}.ln1|ln2.hook_scale|hook_normalized``,
    ``blocks.{l}.mlp.hook_pre|hook_pre_linear|hook_post``, ``blocks.{l}.attn.*`` (attention layers) or
    ``blocks.{l}.mixer.*`` (recurrent layers); ``ln_final.hook_scale|hook_normalized``. See docs/hooks.md."""

    def __init__(self, cfg: HookedQwen35Config, tokenizer=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList([Qwen35Block(cfg, layer) for layer in range(cfg.n_layers)])
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps, zero_centred=True)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)
        self.setup()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        tokenizer=None,
        load_tokenizer: bool = True,
    ) -> "HookedQwen35":
        """Load a local checkpoint folder or a hub id (``qwen3_5_text`` or the multimodal ``qwen3_5`` wrapper).

        Hub ids need a network (``huggingface_hub.snapshot_download``); local folders are read directly.
        """
        from transformers import AutoConfig

        folder = resolve_folder(name_or_path)
        hf_config = AutoConfig.from_pretrained(folder)
        text_config_of(hf_config)  # clear error for unsupported model types
        if tokenizer is None and load_tokenizer:
            tokenizer = try_load_tokenizer(folder)
        tensors = load_checkpoint_tensors(folder, skip_prefixes=IGNORED_PREFIXES)
        model = cls._from_config_and_weights(hf_config, tensors, device, dtype, tokenizer)
        model.cfg.model_name = str(name_or_path)
        return model

    @classmethod
    def from_hf_model(cls, hf_model, tokenizer=None, device=None, dtype: torch.dtype | None = None) -> "HookedQwen35":
        """Convert an instantiated ``Qwen3_5ForCausalLM`` (or ``Qwen3_5ForConditionalGeneration``)."""
        first = next(hf_model.parameters())
        return cls._from_config_and_weights(
            hf_model.config, hf_model.state_dict(), device or first.device, dtype or first.dtype, tokenizer
        )

    @classmethod
    def _from_config_and_weights(cls, hf_config, hf_state, device, dtype, tokenizer) -> "HookedQwen35":
        text = text_config_of(hf_config)
        rope_type = (text.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: 'default'")
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg = HookedQwen35Config.from_hf_config(hf_config, device=device, dtype=dtype)
        if tokenizer is not None:
            cfg.default_prepend_bos = tokenizer.bos_token_id is not None and cfg.bos_token_id is not None
        with torch.device("meta"):
            model = cls(cfg, tokenizer)
        expected = model.state_dict()
        weights = convert_state_dict(hf_state, expected, our_name, cfg.tie_word_embeddings, "Qwen3.5")
        model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
        for module in model.modules():  # rebuild non-persistent buffers that were created on the meta device
            if hasattr(module, "inv_freq"):
                rotary_dim, theta = cfg.rotary_dim, cfg.rope_theta
                module.inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        return model.to(device)

