"""Reading transformers checkpoints for any family: folders or hub ids, tensors, tokenizers, renaming tables."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor


def resolve_folder(name_or_path) -> Path:
    """A local checkpoint folder, or a hub id ``org/name`` downloaded with ``huggingface_hub`` (needs a network)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint folder (holding config.json and the weights)")
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint folder at {name_or_path!r}, and it is not a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


def try_load_tokenizer(folder: Path):
    """The folder's tokenizer (``AutoTokenizer``), or None when it ships none."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_checkpoint_tensors(folder, skip_prefixes: Sequence[str] = ()) -> dict[str, Tensor]:
    """All tensors of a transformers checkpoint folder (``*.safetensors``, sharded or not, or
    ``pytorch_model*.bin``); keys starting with ``skip_prefixes`` are not even read from safetensors files."""
    from safetensors import safe_open

    folder = Path(folder)
    skip = tuple(skip_prefixes)
    files = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, Tensor] = {}
    if files:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if not (skip and key.startswith(skip)):
                        tensors[key] = f.get_tensor(key)
        return tensors
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        for file in bins:
            tensors.update(torch.load(file, map_location="cpu", weights_only=True))
        return {k: v for k, v in tensors.items() if not (skip and k.startswith(skip))}
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def rename_with_table(table: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    """A renaming function from (regular expression, target) rules; named groups fill the target's fields."""

    def rename(key: str) -> str:
        for pattern, target in table:
            match = re.fullmatch(pattern, key)
            if match:
                return target.format(**match.groupdict())
        raise KeyError(key)

    return rename


def convert_state_dict(
    hf_state: dict[str, Tensor],
    expected: dict[str, Tensor],
    rename: Callable[[str], str | None],
    tie_word_embeddings: bool,
    family: str,
) -> dict[str, Tensor]:
    """Rename (``rename`` returns our name, None to ignore a key, or raises KeyError for an unknown key) and
    shape-check ``hf_state`` against our model's ``expected`` state dict; one error lists every problem."""
    converted, unexpected, bad_shapes = {}, [], []
    for key, tensor in hf_state.items():
        try:
            name = rename(key)
        except KeyError:
            unexpected.append(key)
            continue
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            bad_shapes.append(f"{key} -> {name}: checkpoint {tuple(tensor.shape)}, model {tuple(expected[name].shape)}")
            continue
        converted[name] = tensor
    if "unembed.weight" not in converted and tie_word_embeddings and "embed.W_E" in converted:
        converted["unembed.weight"] = converted["embed.W_E"]
    missing = sorted(set(expected) - set(converted))
    problems = []
    if unexpected:
        problems.append(f"unexpected checkpoint keys: {sorted(unexpected)}")
    if missing:
        problems.append(f"model parameters missing from the checkpoint: {missing}")
    if bad_shapes:
        problems.append("shape mismatches: " + "; ".join(bad_shapes))
    if problems:
        raise ValueError(f"cannot load this {family} checkpoint:\n  " + "\n  ".join(problems))
    return converted
