"""Weight conversion: transformers' Qwen3.5 state dict -> HookedQwen35 parameter names, as an explicit table.

Every checkpoint key is matched by one rule of ``RENAMES`` (a regular expression on the transformers name and the
name of our parameter); shapes are checked one by one, and missing or unexpected keys are errors listing them.
The multimodal wrapper's text weights live under ``model.language_model.``; its vision tower (``model.visual.``) and
the multi-token-prediction head (``mtp.``) are ignored, as transformers' own text model ignores them.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

# (transformers key pattern, our parameter name); {l} is the layer index.
RENAMES: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "embed.W_E"),
    (r"model\.norm\.weight", "ln_final.w"),
    (r"lm_head\.weight", "unembed.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blocks.{l}.ln1.w"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blocks.{l}.ln2.w"),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "blocks.{l}.mlp.{m}.weight"),
    # Gated DeltaNet
    (r"model\.layers\.(\d+)\.linear_attn\.(in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|out_proj|conv1d)\.weight",
     "blocks.{l}.mixer.{m}.weight"),
    (r"model\.layers\.(\d+)\.linear_attn\.(dt_bias|A_log)", "blocks.{l}.mixer.{m}"),
    (r"model\.layers\.(\d+)\.linear_attn\.norm\.weight", "blocks.{l}.mixer.norm_w"),
    # gated full attention
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight", "blocks.{l}.attn.{m}.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight", "blocks.{l}.attn.{m}.w"),
]
IGNORED_PREFIXES = ("model.visual.", "mtp.")
MULTIMODAL_TEXT_PREFIX = "model.language_model."


def our_name(hf_key: str) -> str | None:
    """Our parameter name for a transformers key (None if the key is ignored); KeyError if no rule matches."""
    if hf_key.startswith(MULTIMODAL_TEXT_PREFIX):
        hf_key = "model." + hf_key[len(MULTIMODAL_TEXT_PREFIX):]
    if hf_key.startswith(IGNORED_PREFIXES):
        return None
    for pattern, target in RENAMES:
        match = re.fullmatch(pattern, hf_key)
        if match:
            groups = match.groups()
            return target.format(l=groups[0] if groups else "", m=groups[1] if len(groups) > 1 else "")
    raise KeyError(hf_key)


def convert_state_dict(hf_state: dict[str, Tensor], expected: dict[str, Tensor], tie_word_embeddings: bool) -> dict:
    """Rename and shape-check ``hf_state`` against our model's ``expected`` state dict."""
    converted, unexpected, bad_shapes = {}, [], []
    for key, tensor in hf_state.items():
        try:
            name = our_name(key)
        except KeyError:
            unexpected.append(key)
            continue
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            bad_shapes.append(f"{key} -> {name}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[name].shape)}")
            continue
        converted[name] = tensor
    if "unembed.weight" not in converted and tie_word_embeddings and "embed.W_E" in converted:
        converted["unembed.weight"] = converted["embed.W_E"]
    missing = sorted(set(expected) - set(converted))
    problems = []
    if unexpected:
        problems.append(f"unexpected checkpoint keys: {sorted(unexpected)}")
    if missing:
        problems.append(f"model parameters missing from the checkpoint: {missing}")
    if bad_shapes:
        problems.append("shape mismatches: " + "; ".join(bad_shapes))
    if problems:
        raise ValueError("cannot load this Qwen3.5 checkpoint:\n  " + "\n  ".join(problems))
    return converted


def load_checkpoint_tensors(folder) -> dict[str, Tensor]:
    """All tensors of a transformers checkpoint folder (``model.safetensors``, sharded safetensors, or
    ``pytorch_model.bin``), skipping the vision tower's weights without reading them."""
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        tensors = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if not key.startswith(("model.visual.", "mtp.")):
                        tensors[key] = f.get_tensor(key)
        return tensors
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        tensors = {}
        for file in bins:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True))
        return tensors
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")
