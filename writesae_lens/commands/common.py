"""Arguments and loading steps shared by the ``writesae`` subcommands.

Counts are parsed with ``positive_int`` / ``non_negative_int`` / ``int_at_least(n)``: a bad value is an argparse
error naming the value and what is valid (exit code 2), before anything is loaded.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def int_at_least(minimum: int, what: str | None = None):
    """An argparse type: an integer >= ``minimum`` (``what`` describes the valid values in the message)."""
    valid = what or (f"an integer >= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; valid: {valid}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small; valid: {valid}")
        return value

    parse.__name__ = "int"
    return parse


positive_int = int_at_least(1, "a positive integer (1 or more)")
non_negative_int = int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; valid: a finite number > 0") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not valid; valid: a finite number > 0")
    return value


def model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a shipped model name (qwen35-tiny, mamba2-tiny), a checkpoint folder, or a hub id")
    parser.add_argument("--text", type=Path, default=None,
                        help="a UTF-8 text file, documents separated by <|endoftext|> or blank lines "
                        "(default: the held-out text shipped with the package)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model weights' dtype")


def cell_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layer", type=int, required=True, help="a recurrent layer of the model")
    parser.add_argument("--head", type=int, required=True, help="a head of that layer")


def sae_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--sae", type=Path, required=required,
                        help="folder of a saved WriteSAE (SAE.load_from_disk)")


def ignore_metadata_argument(parser: argparse.ArgumentParser) -> None:
    """``--ignore-sae-metadata``; a command that adds it passes ``args.ignore_sae_metadata`` to ``check_cell`` /
    ``replacement_test`` / the interventions."""
    parser.add_argument("--ignore-sae-metadata", action="store_true",
                        help="use the SAE even if its metadata records another model, hook or head (the state shape "
                        "must still match)")


def output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (must be empty or new)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --out (only once this run has succeeded)")


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def load_model(args):
    """The hooked model named by ``--model`` on ``--device`` in ``--dtype``."""
    from ..models import load_hooked_model

    return load_hooked_model(args.model, device=args.device, dtype=torch_dtype(args.dtype))


def load_sae(path: Path, device: str):
    """A saved WriteSAE (any SAELens folder), with a clear error naming the file when the folder is not one, a file
    is unreadable (truncated weights, a cfg.json that is not JSON) or a weight holds NaN or inf."""
    import json

    from sae_lens import SAE

    import writesae_lens.saes  # noqa: F401  (registers the WriteSAE architectures with SAELens)

    from ..hooking.loading import resolve_device
    from ..ops.finite import all_finite

    path = Path(path)
    if not (path / "cfg.json").exists():
        raise FileNotFoundError(f"{path} is not a saved SAE folder (no cfg.json)")
    try:
        json.loads((path / "cfg.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path / 'cfg.json'} is not valid JSON ({error})") from None
    resolve_device(device)
    try:
        sae = SAE.load_from_disk(path, device=device)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"cannot load the SAE in {path}: {type(error).__name__}: {error}") from None
    except Exception as error:  # noqa: BLE001  (safetensors' SafetensorError: a truncated or corrupted file)
        raise ValueError(f"cannot load the SAE in {path}: {error}; a weights file is truncated or corrupted") from None
    for name, tensor in sae.state_dict().items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ValueError(f"the SAE in {path} has non-finite values (NaN or inf) in {name!r}: the file is corrupted")
    return sae


def heldout_passages(model, args, n_passages: int, n_pos: int, whole_text: bool = False):
    """``[n, n_pos]`` evaluation passages on the model's device, from the held-out part (the last fifth of the
    documents) of ``--text`` or of the shipped text: the part a command that also trains on ``--text`` (or ``train``)
    leaves out. ``whole_text``: every document of ``--text`` (the user's evaluation text, for commands that train
    nothing on it: ``substitution``); the shipped text is still split."""
    from .. import pipeline

    if whole_text and args.text is not None:
        documents = pipeline.load_texts(args.text)
    else:
        _, documents = pipeline.split_documents(pipeline.load_texts(args.text))
    return pipeline.token_passages(model, documents, n_passages, n_pos).to(args.device)


def input_paths(args) -> list[Path]:
    """The paths a command reads (``--sae``, ``--text``, ``--model`` when a folder): ``staged_output`` never
    replaces them."""
    paths = [getattr(args, name, None) for name in ("sae", "text")]
    model = getattr(args, "model", None)
    if model is not None and Path(str(model)).exists():
        paths.append(Path(str(model)))
    return [Path(p) for p in paths if p is not None]
