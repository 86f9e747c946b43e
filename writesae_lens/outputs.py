"""Result folders that are never half-written: every command builds its files in a staging folder beside ``--out``
and moves them in only when it has succeeded.

``with staged_output(out, overwrite) as folder:`` yields an empty staging folder (``.NAME.partial-*`` beside
``out``). If the block raises (an error, Ctrl-C), the staging folder is removed and ``out`` is untouched. If it
succeeds, each entry of the staging folder replaces the entry of the same name in ``out`` (the old one is moved
aside first and deleted only after the new one is in place); entries of ``out`` that this run did not write stay
(an SAE or text a user keeps inside ``out`` is never deleted). Without ``overwrite``, a non-empty ``out`` is refused
before anything runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; refuse a path that is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output folder {out} is a file; choose a folder path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} is not empty; choose another or pass --overwrite")


@contextlib.contextmanager
def staged_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A staging folder for a run's results, moved into ``out`` only when the block succeeds (see module doc)."""
    out = Path(out)
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    try:
        for entry in sorted(staging.iterdir()):
            target = out / entry.name
            if target.exists() or target.is_symlink():
                os.replace(target, aside / entry.name)
            os.replace(entry, target)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
