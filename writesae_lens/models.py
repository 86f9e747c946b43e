"""Load any supported checkpoint as the right hooked model: ``load_hooked_model("qwen35-tiny")``.

Accepts the names of the models shipped with the package (``writesae_lens.data.PRETRAINED_MODELS``), a local
checkpoint folder, or a hub id (needs a network); the family is read from ``config.json``'s ``model_type``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = {
    "qwen3_5_text": "HookedQwen35",
    "qwen3_5": "HookedQwen35",
    "mamba2": "HookedMamba2",
    "rwkv7": "HookedRWKV7",
}


def resolve_model_path(name_or_path: str | Path) -> Path | str:
    """A shipped model's folder for its short name; anything else is returned unchanged."""
    from .data import PRETRAINED_MODELS, pretrained_path

    if str(name_or_path) in PRETRAINED_MODELS:
        return pretrained_path(str(name_or_path))
    return name_or_path


def load_hooked_model(name_or_path: str | Path, device: str | torch.device | None = None,
                      dtype: torch.dtype | str = torch.float32):
    """The hooked model for a checkpoint, chosen by its ``model_type``; a clear error for unsupported ones."""
    from . import adapters
    from .hooking.loading import resolve_folder

    folder = resolve_folder(resolve_model_path(name_or_path))
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {folder}: not a transformers checkpoint folder")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r} in {config_file}; supported: {', '.join(FAMILIES)}")
    model_class = getattr(adapters, FAMILIES[model_type])
    model = model_class.from_pretrained(folder, device=device, dtype=dtype)
    model.cfg.model_name = str(name_or_path)
    return model.eval()
