"""RWKV-7 (flash-linear-attention ``RWKV7ForCausalLM``, model_type ``rwkv7``): the DPLR recurrence through the shared
write interface."""

from .config import HookedRWKV7Config
from .model import HookedRWKV7

__all__ = ["HookedRWKV7", "HookedRWKV7Config"]
