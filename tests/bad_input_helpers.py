"""Small WriteSAEs with recorded metadata, and copies of the shipped models to damage, for the bad-input tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def write_sae(d_k: int = 32, d_v: int = 32, *, model_name: str | None = "qwen35-tiny", layer: int | None = 1,
              head: int | None = 0, d_sae: int = 64, k: int = 4, seed: int = 0):
    """A random TopK WriteSAE whose metadata records (model_name, blocks.{layer}.mixer.hook_state, head); None
    fields are left unrecorded. Weights ~ N(0, 0.1): every state has k active features."""
    from sae_lens.saes.sae import SAEMetadata

    import writesae_lens.saes as ws

    generator = torch.Generator().manual_seed(seed)
    sae = ws.WriteTopKSAE(ws.WriteTopKSAEConfig(d_in=d_k * d_v, d_sae=d_sae, d_k=d_k, d_v=d_v, k=k))
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    recorded = {"model_name": model_name, "hook_head_index": head,
                "hook_name": None if layer is None else f"blocks.{layer}.mixer.hook_state"}
    sae.cfg.metadata = SAEMetadata(**{key: value for key, value in recorded.items() if value is not None})
    return sae


def saved_write_sae(folder: Path, **kwargs) -> Path:
    write_sae(**kwargs).save_model(folder)
    return Path(folder)


def copy_of_model(name: str, dest: Path) -> Path:
    """A copy of a shipped model's folder, to damage."""
    from writesae_lens.data import pretrained_path

    shutil.copytree(pretrained_path(name), dest)
    return Path(dest)
