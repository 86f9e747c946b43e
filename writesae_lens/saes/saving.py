"""Write an SAE folder so that a crash never leaves a half-written one behind.

Files go to a hidden temporary sibling folder first, which is renamed onto the target only once
everything is written. SAELens' trainer and runner create the target folder (empty) before
calling `save_model` / `save_inference_model`, so an existing empty folder is fine; an existing
non-empty one is refused unless `overwrite=True`.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _folder_has_contents(folder: Path) -> bool:
    return any(folder.iterdir())


def write_folder_atomically(
    target: str | os.PathLike[str],
    write_into: Callable[[Path], object],
    *,
    overwrite: bool = False,
) -> Path:
    """Call write_into(temporary_folder), then move that folder to `target`; returns `target`.

    Raises FileExistsError if `target` holds files and `overwrite` is False, and
    NotADirectoryError if it is a file. When writing fails, the temporary folder is removed and
    `target` is left as it was.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"Cannot save an SAE to {target}: it is a file, not a folder.")
    if target.is_dir() and _folder_has_contents(target) and not overwrite:
        raise FileExistsError(
            f"Refusing to save an SAE into {target}: the folder is not empty. Pass "
            "overwrite=True to replace it, or choose a new or empty folder."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-", dir=target.parent))
    try:
        write_into(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, target)
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    if not _folder_has_contents(target):
        target.rmdir()
        os.replace(staging, target)
        return
    # Overwriting: park the old folder beside the target until the new one is in place.
    parked = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    parked.rmdir()
    os.replace(target, parked)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(parked, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(parked, ignore_errors=True)
