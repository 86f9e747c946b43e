"""Write an SAE folder so that a crash never leaves a half-written one behind.

Files go to a hidden temporary sibling folder first, which is renamed onto the target only once
everything is written. SAELens' trainer and runner create the target folder (empty) before
calling `save_model` / `save_inference_model`, so an existing empty folder is fine; an existing
non-empty one is refused unless `overwrite=True`.

A process killed while writing (SIGKILL) cannot remove its temporary folder; the folder's name carries the process
id (`.NAME.writing-PID-*`), and the next save beside the same target removes those whose process is gone. The saved
folder and its files get the modes the user's umask gives (temporary folders are created private).
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from writesae_lens.outputs import apply_umask, remove_stale


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
    remove_stale(target.parent, f".{target.name}.writing-")
    remove_stale(target.parent, f".{target.name}.replaced-")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.writing-{os.getpid()}-", dir=target.parent))
    try:
        write_into(staging)
        apply_umask(staging)
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
    parked = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-{os.getpid()}-", dir=target.parent))
    parked.rmdir()
    os.replace(target, parked)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(parked, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(parked, ignore_errors=True)
