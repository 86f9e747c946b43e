"""What the config of every hooked family shares: the layer kinds and the runtime fields."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

RECURRENT, ATTENTION = "linear_attention", "full_attention"  # ``layer_types`` entries, as transformers names them
UNBOUNDED_CONTEXT = 1 << 20  # families without a positional limit: ``to_tokens(truncate=True)`` cuts here


@dataclass(kw_only=True)
class FamilyConfig:
    """Base of ``HookedQwen35Config``, ``HookedMamba2Config``, ``HookedRWKV7Config``: special tokens, where the weights
    live and in which dtype, the name, and anything else a checkpoint's config carries (``extra``). Keyword-only, so
    each family's own (architecture) fields come first. Subclasses define ``layer_types``."""

    tie_word_embeddings: bool = False
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    default_prepend_bos: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    model_name: str = "model"
    extra: dict = field(default_factory=dict)

    @property
    def recurrent_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == RECURRENT]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == ATTENTION]
