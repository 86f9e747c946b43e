"""Qwen3.5-family hybrids (Gated DeltaNet + gated attention)."""

from .config import HookedQwen35Config
from .model import HookedQwen35

__all__ = ["HookedQwen35", "HookedQwen35Config"]
