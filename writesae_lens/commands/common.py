"""Arguments and loading steps shared by the ``writesae`` subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    """A saved WriteSAE (any SAELens folder), with a clear error when the folder is not one."""
    from sae_lens import SAE

    import writesae_lens.saes  # noqa: F401  (registers the WriteSAE architectures with SAELens)

    path = Path(path)
    if not (path / "cfg.json").exists():
        raise FileNotFoundError(f"{path} is not a saved SAE folder (no cfg.json)")
    return SAE.load_from_disk(path, device=device)


def heldout_passages(model, args, n_passages: int, n_pos: int):
    """``[n, n_pos]`` held-out passages from ``--text`` (or the shipped held-out text) on the model's device."""
    from .. import pipeline

    _, eval_docs = pipeline.split_documents(pipeline.load_texts(args.text))
    return pipeline.token_passages(model, eval_docs, n_passages, n_pos).to(args.device)
