"""The sweep's output folder, resumable and never half-written.

    OUT/sweep.json            the sweep's config and fingerprint (written before any training)
    OUT/trained/RUN/          a trained SAE (SAE.load_from_disk), not yet evaluated
    OUT/runs/RUN/             a finished run: sae/, substitution/ (records, summary, plots), metrics.json
    OUT/results.csv, .parquet the results table (one row per finished run)
    OUT/heatmaps/VARIANT.png  layer x head win rate (mean over seeds)
    OUT/.partial-PID-*/       staging of a running process; a killed one's is removed by the next run

A folder under trained/ or runs/ appears by one rename once everything in it is written, so one that exists is
complete; a rerun skips runs already in runs/, evaluates those in trained/, and trains the others from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..outputs import apply_umask, current_umask, remove_stale
from .config import SweepConfig, SweepConfigError

SWEEP_FILE = "sweep.json"
PARTIAL_PREFIX = ".partial-"


class SweepFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def trained(self) -> Path:
        return self.root / "trained"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def is_finished(self, run_name: str) -> bool:
        return (self.runs / run_name).is_dir()

    def is_trained(self, run_name: str) -> bool:
        return (self.trained / run_name).is_dir()

    def check(self, config: SweepConfig) -> None:
        """Refuse a folder that holds anything but this sweep (another sweep's runs, other files) — before any
        training. A missing or empty folder is fine."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise SweepConfigError(f"output folder {root} is a file; choose a folder path")
        if not root.exists() or not any(root.iterdir()):
            return
        sweep_file = root / SWEEP_FILE
        if not sweep_file.is_file():
            raise SweepConfigError(f"output folder {root} is not empty and holds no {SWEEP_FILE}: it is not a sweep's "
                                   "folder; choose another")
        try:
            recorded = json.loads(sweep_file.read_text(encoding="utf-8"))
            fingerprint = recorded["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise SweepConfigError(f"{sweep_file} is unreadable ({error}); choose another output folder") from None
        if fingerprint != config.fingerprint():
            raise SweepConfigError(f"output folder {root} holds another sweep (its {SWEEP_FILE} records other "
                                   "settings); choose another folder, or rerun with that sweep's config to resume it")

    def start(self, config: SweepConfig) -> None:
        """Create the folder, record the sweep, remove staging left by killed processes (rank 0 only)."""
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale(self.root, PARTIAL_PREFIX)
        if not (self.root / SWEEP_FILE).exists():
            write_atomically(self.root / SWEEP_FILE,
                             json.dumps({"fingerprint": config.fingerprint(), "config": config.to_dict()}, indent=2))

    def staging(self, rank: int) -> Path:
        """A fresh staging folder of this process inside the sweep folder (same file system: renames are atomic)."""
        return Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{os.getpid()}-r{rank}-", dir=self.root))

    def publish(self, staged: Path, destination: Path) -> None:
        """Move a completed folder into place in one rename."""
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            raise FileExistsError(f"{destination} already exists; two processes ran the same run")
        apply_umask(staged)  # staging is private (0700); what is published gets the user's usual modes
        os.rename(staged, destination)

    def retire_trained(self, run_name: str) -> None:
        shutil.rmtree(self.trained / run_name, ignore_errors=True)


def write_atomically(path: Path, text: str | bytes) -> None:
    """Write a file through a temporary beside it and one rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(text.encode("utf-8") if isinstance(text, str) else text)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp's file is private
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
