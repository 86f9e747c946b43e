"""One hooked model per recurrent family, all with the write interface under ``blocks.{l}.mixer``.

Installed as ``writesae_lens.adapters`` (never as a top-level ``adapters`` package: an unrelated PyPI project owns
that name). Families are imported lazily so that importing one does not import the others.
"""

from importlib import import_module

_FAMILIES = {
    "HookedQwen35": ".qwen35",
    "HookedQwen35Config": ".qwen35",
    "HookedMamba2": ".mamba2",
    "HookedMamba2Config": ".mamba2",
    "HookedRWKV7": ".rwkv7",
    "HookedRWKV7Config": ".rwkv7",
}

__all__ = sorted(_FAMILIES)


def __getattr__(name: str):
    if name in _FAMILIES:
        return getattr(import_module(_FAMILIES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
