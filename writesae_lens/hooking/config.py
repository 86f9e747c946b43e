"""What the config of every hooked family shares: the layer kinds and the runtime fields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

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

    # Per family: transformers' class of the checkpoints (``original_architecture``) and the kind of norm before each
    # sublayer and the unembedding, in TransformerLens' words ("RMS" or "LN"; the weights are not folded).
    hf_architecture: ClassVar[str] = ""
    norm_kind: ClassVar[str] = "RMS"

    @property
    def d_vocab_out(self) -> int:
        """Width of the logits (the unembedding has no separate output vocabulary)."""
        return self.d_vocab

    @property
    def original_architecture(self) -> str:
        """The transformers (or fla) class whose checkpoints this family loads."""
        return self.hf_architecture

    @property
    def normalization_type(self) -> str:
        """TransformerLens' name of the norm kind; ``ActivationCache.apply_ln_to_stack`` reads it."""
        return self.norm_kind

    def to_dict(self) -> dict:
        """Every field, plus the derived fields TransformerLens users read (``d_vocab_out``,
        ``original_architecture``, ``normalization_type``, the layer kinds)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["extra"] = dict(self.extra)
        out.update(d_vocab_out=self.d_vocab_out, original_architecture=self.original_architecture,
                   normalization_type=self.normalization_type, layer_types=list(self.layer_types))
        return out

    @property
    def recurrent_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == RECURRENT]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind == ATTENTION]
