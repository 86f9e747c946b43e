"""Reading transformers checkpoints for any family: folders or hub ids, tensors, tokenizers, renaming tables; and the
checks that turn bad input (a truncated file, a config that is not JSON, corrupted weights, a dtype or device this
torch build lacks) into errors that name the file, tensor or value and what is valid."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor


def resolve_folder(name_or_path) -> Path:
    """A local checkpoint folder, or a hub id ``org/name`` downloaded with ``huggingface_hub`` (needs a network)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        check_config_json(path)
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint folder (holding config.json and the weights)")
    if str(name_or_path).count("/") != 1 or str(name_or_path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint folder at {name_or_path!r}, and it is not a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    check_config_json(folder)
    return folder


def check_config_json(folder: Path) -> None:
    """A clear error, naming the file, when the folder's ``config.json`` exists but is not a JSON object."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        return
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file} is not valid JSON ({error}); restore the checkpoint's config.json") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds a JSON {type(config).__name__}, not an object of config fields")


FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


def resolve_dtype(dtype) -> torch.dtype:
    """A floating torch dtype from a dtype or its name (``"bfloat16"``, ``"torch.bfloat16"``); errors list the valid."""
    valid = ", ".join(FLOAT_DTYPES)
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in FLOAT_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; valid: {valid} (names or torch dtypes)")
        return FLOAT_DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype {dtype!r} is not a floating torch dtype; valid: {valid} (names or torch dtypes)")
    return dtype


def resolve_dtype_arguments(dtype, torch_dtype) -> torch.dtype:
    """The dtype of ``from_pretrained(dtype=..., torch_dtype=...)``: either name may be given (``torch_dtype`` is
    transformers' name), a torch dtype or its name; neither means float32."""
    if dtype is not None and torch_dtype is not None and resolve_dtype(dtype) != resolve_dtype(torch_dtype):
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
    chosen = dtype if dtype is not None else torch_dtype
    return torch.float32 if chosen is None else resolve_dtype(chosen)


def resolve_device(device) -> torch.device | None:
    """``device`` as a ``torch.device`` this torch build and machine have (None stays None: the default); a clear error
    for a malformed name, a backend the build lacks, or a device index beyond the devices present."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device name ({error}); e.g. 'cpu', 'cuda', 'cuda:0'") \
            from None
    if resolved.type == "cpu" or resolved.type == "meta":
        return resolved
    backend = getattr(torch, resolved.type, None)
    available = getattr(backend, "is_available", lambda: False)
    if resolved.type == "mps":
        available = torch.backends.mps.is_available
    if not available():
        raise ValueError(f"device {device!r} is not available: this torch build ({torch.__version__}) or machine has "
                         f"no {resolved.type} device; available: {', '.join(available_devices())}")
    count = getattr(backend, "device_count", lambda: 1)()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"device {device!r} does not exist: there are {count} {resolved.type} device(s), "
                         f"{resolved.type}:0..{resolved.type}:{count - 1}")
    return resolved


def available_devices() -> list[str]:
    """The device names this torch build and machine can use."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def canonical_model_name(name) -> str | None:
    """One spelling per model, to compare the model an SAE was trained on with the one it is used with: a shipped
    model's short name (also when given as its folder), a local folder's absolute path, otherwise the name as given."""
    if name is None:
        return None
    from ..data import PRETRAINED_MODELS, pretrained_path

    text = str(name)
    if text in PRETRAINED_MODELS:
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        for short in PRETRAINED_MODELS:
            if pretrained_path(short).resolve() == resolved:
                return short
        return str(resolved)
    return text


def try_load_tokenizer(folder: Path):
    """The folder's tokenizer (``AutoTokenizer``), or None when it ships none."""
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_checkpoint_tensors(folder, skip_prefixes: Sequence[str] = ()) -> dict[str, Tensor]:
    """All tensors of a transformers checkpoint folder (``*.safetensors``, sharded or not, or
    ``pytorch_model*.bin``); keys starting with ``skip_prefixes`` are not even read from safetensors files. A file
that cannot be read, or a floating tensor holding NaN or inf, is an error naming the file (and the tensor)."""
    folder = Path(folder)
    skip = tuple(skip_prefixes)
    files = sorted(folder.glob("*.safetensors"))
    tensors: dict[str, Tensor] = {}
    if files:
        for file in files:
            tensors.update(_read_safetensors(file, skip))
        return tensors
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        for file in bins:
            try:
                loaded = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001  (pickle, zip and torch errors: all mean an unreadable file)
                raise ValueError(f"cannot read {file}: {error}") from None
            tensors.update(_checked_finite(loaded, file))
        return {k: v for k, v in tensors.items() if not (skip and k.startswith(skip))}
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {folder}")


def _read_safetensors(file: Path, skip: tuple[str, ...]) -> dict[str, Tensor]:
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if not (skip and key.startswith(skip)):
                    tensors[key] = f.get_tensor(key)
    except Exception as error:  # noqa: BLE001  (SafetensorError and OSError: the file is truncated or not safetensors)
        size = file.stat().st_size if file.exists() else 0
        raise ValueError(f"cannot read {file} ({size} bytes): {error}; the file is truncated or is not a safetensors "
                         "file (download or copy it again)") from None
    return _checked_finite(tensors, file)


def _checked_finite(tensors: dict[str, Tensor], file: Path) -> dict[str, Tensor]:
    """The tensors, after checking that every floating one is finite (corrupted bytes often decode as NaN or inf)."""
    from ..ops.finite import all_finite

    for key, tensor in tensors.items():
        if isinstance(tensor, Tensor) and tensor.is_floating_point() and not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"tensor {key!r} in {file} holds {bad} non-finite value(s) (NaN or inf) of "
                             f"{tensor.numel()}: the file is corrupted")
    return tensors


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
