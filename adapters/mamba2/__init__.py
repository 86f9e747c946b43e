"""Mamba-2 (transformers ``Mamba2ForCausalLM``): the SSD recurrence through the shared write interface."""

from .config import HookedMamba2Config
from .model import HookedMamba2

__all__ = ["HookedMamba2", "HookedMamba2Config"]
