"""The hooked test model of each family, for tests parametrized over families."""

from __future__ import annotations


def family_model(name: str, qwen35_pair, mamba2_pair):
    """The hooked test model of a family: the non-square GQA Qwen3.5, the grouped non-square Mamba-2, or a random
    non-square RWKV-7 (97-token vocabulary)."""
    if name == "rwkv7":
        from rwkv7_factory import random_rwkv7

        return random_rwkv7(97)
    return {"qwen35": qwen35_pair, "mamba2": mamba2_pair}[name][1]
