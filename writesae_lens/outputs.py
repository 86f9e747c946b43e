"""Result folders that are never half-written: every command builds its files in a staging folder beside ``--out``
and moves them in only when it has succeeded.

``with staged_output(out, overwrite, inputs=[...]) as folder:`` yields an empty staging folder
(``.NAME.partial-PID-*`` beside ``out``). If the block raises (an error, Ctrl-C), the staging folder is removed and
``out`` is untouched. If it succeeds, each entry of the staging folder replaces the entry of the same name in ``out``
(the old one is moved aside first and deleted only after the new one is in place); entries of ``out`` that this run
did not write stay (an SAE or text a user keeps inside ``out`` is never deleted). An entry of ``out`` that holds one
of ``inputs`` (or lies inside one) is never replaced: the run fails before anything moves. Without ``overwrite``, a
non-empty ``out`` is refused before anything runs.

A process killed outright (SIGKILL, power loss) cannot clean up: its staging folder stays, hidden, and carries the
process id in its name; the next ``staged_output`` beside the same ``out`` removes the ones whose process is gone.
Files and folders moved into ``out`` get the permissions the user's umask gives new files (temporary files and
folders are created private, 0600 / 0700).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``; refuse a path that is a file or lies under a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output folder {out} is a file; choose a folder path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"output folder {out} lies under {parent}, which is a file; choose a folder path")
            break
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} is not empty; choose another or pass --overwrite")


@contextlib.contextmanager
def staged_output(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """A staging folder for a run's results, moved into ``out`` only when the block succeeds (see module doc).
    ``inputs``: paths the run reads (an SAE folder, a text file), which the move must never replace."""
    out = Path(out)
    check_output_folder(out, overwrite)
    protected = [Path(p).resolve() for p in inputs if p is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, f".{out.name}.partial-")
    remove_stale(out.parent, f".{out.name}.replaced-")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _check_inputs_kept(staging, out, protected)
        apply_umask(staging)
        _move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes a new file / folder gets under the user's umask (files keep
    their executable bits only if they had them)."""
    mask = current_umask()
    root = Path(root)
    if not root.is_dir():
        executable = os.stat(root).st_mode & stat.S_IXUSR
        os.chmod(root, (0o777 if executable else 0o666) & ~mask)
        return
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & stat.S_IXUSR
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove the folders ``{prefix}{pid}-*`` in ``folder`` whose process ``pid`` no longer runs (left by a killed
    run); returns them. Folders of running processes, and names without a process id, are left alone."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for entry in Path(folder).iterdir():
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _check_inputs_kept(staging: Path, out: Path, protected: list[Path]) -> None:
    for entry in staging.iterdir():
        target = (out / entry.name).resolve()
        for path in protected:
            if path == target or target in path.parents:
                raise FileExistsError(
                    f"this run's result {entry.name!r} would replace {out / entry.name}, which holds its input "
                    f"{path}; choose another --out (the input was left untouched)")


def _move_into(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-{os.getpid()}-", dir=out.parent))
    try:
        for entry in sorted(staging.iterdir()):
            target = out / entry.name
            if target.exists() or target.is_symlink():
                os.replace(target, aside / entry.name)
            os.replace(entry, target)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
