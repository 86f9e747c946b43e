"""Weight conversion: transformers' Mamba-2 state dict -> HookedMamba2 parameter names, as an explicit table.

Every checkpoint key is matched by one rule of ``RENAMES``; no tensor is transposed or reshaped (the depthwise conv
kernel keeps transformers' ``[conv_dim, 1, kernel]``). Shapes are checked one by one, and missing or unexpected keys
are errors listing them. ``lm_head.weight`` may be absent when the embeddings are tied.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

_LAYER = r"backbone\.layers\.(?P<l>\d+)"
# (transformers key pattern, our parameter name); named groups fill the placeholders.
RENAMES: list[tuple[str, str]] = [
    (r"backbone\.embeddings?\.weight", "embed.W_E"),  # older checkpoints say `embedding` (transformers renames it)
    (r"backbone\.norm_f\.weight", "ln_final.w"),
    (r"lm_head\.weight", "unembed.weight"),
    (_LAYER + r"\.norm\.weight", "blocks.{l}.ln1.w"),
    (_LAYER + r"\.mixer\.(?P<m>in_proj|out_proj|conv1d)\.(?P<p>weight|bias)", "blocks.{l}.mixer.{m}.{p}"),
    (_LAYER + r"\.mixer\.(?P<m>dt_bias|A_log|D)", "blocks.{l}.mixer.{m}"),
    (_LAYER + r"\.mixer\.norm\.weight", "blocks.{l}.mixer.norm_w"),
]


def our_name(hf_key: str) -> str:
    """Our parameter name for a transformers key; KeyError if no rule matches."""
    for pattern, target in RENAMES:
        match = re.fullmatch(pattern, hf_key)
        if match:
            return target.format(**match.groupdict())
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
        raise ValueError("cannot load this Mamba-2 checkpoint:\n  " + "\n  ".join(problems))
    return converted


def load_checkpoint_tensors(folder: Path) -> dict[str, Tensor]:
    """All tensors of a transformers checkpoint folder (``*.safetensors``, or ``pytorch_model*.bin``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        tensors = {}
        for file in files:
            tensors.update(load_file(str(file)))
        return tensors
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        tensors = {}
        for file in bins:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True))
        return tensors
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")
