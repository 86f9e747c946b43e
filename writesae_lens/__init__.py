"""writesae-lens: hooked recurrent language models and WriteSAEs on their matrix-valued state.

Importing the package is cheap; the heavy parts load on first use:

    from writesae_lens import HookedQwen35
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "HookedQwen35": "writesae_lens.adapters.qwen35",
    "HookedQwen35Config": "writesae_lens.adapters.qwen35",
    "HookedMamba2": "writesae_lens.adapters.mamba2",
    "HookedMamba2Config": "writesae_lens.adapters.mamba2",
    "HookedRWKV7": "writesae_lens.adapters.rwkv7",
    "HookedRWKV7Config": "writesae_lens.adapters.rwkv7",
    "RecurrentCache": "writesae_lens.hooking.cache",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'writesae_lens' has no attribute {name!r}")
