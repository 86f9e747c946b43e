"""``HookedQwen35``: Qwen3.5-family hybrids (Gated DeltaNet + gated attention) as a transformer_lens HookedRootModule.

    model = HookedQwen35.from_pretrained("path/to/Qwen3.5-0.8B")            # or a hub id when online
    logits, cache = model.run_with_cache("The cat sat", names_filter=lambda n: "mixer.hook_write" in n)

The forward pass is the project's own pure-torch code (hooks sit inside it and stay active while generating);
transformers is used to read configs, weights and tokenizers, and as the parity oracle in the tests.
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

from writesae_lens.hooking.components import Embed, RMSNorm, Unembed
from writesae_lens.hooking.loading import convert_state_dict
from writesae_lens.hooking.root import HookedRecurrentLM
from writesae_lens.splicing.mixin import HookedSAEMixin

from .config import HookedQwen35Config, text_config_of
from .layers import Qwen35Block
from .weights import IGNORED_PREFIXES, our_name


class HookedQwen35(HookedSAEMixin, HookedRecurrentLM):
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

    def final_norm_gain(self):
        """The weight [d_model] ``ln_final`` multiplies the normalised stream by."""
        return 1.0 + self.ln_final.w  # Qwen3.5's norms store w - 1

    # ------------------------------------------------------------------ loading
    skip_checkpoint_prefixes = IGNORED_PREFIXES  # the multimodal wrapper's vision tower, the MTP head

    @classmethod
    def _check_hf_config(cls, hf_config) -> None:
        text_config_of(hf_config)  # accepts qwen3_5_text and the multimodal qwen3_5 wrapper

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

