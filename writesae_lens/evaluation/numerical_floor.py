"""The numerical floor of a substitution run, and the firings whose effect lies below it.

Each firing's record holds ``kl_floor``: the KL (the larger of its two directions) between two computations of the
same native distribution that differ only in rounding: the native pass (all passages' positions at once, the
chunked algebra) and the firing's own unedited row (one decoding step from a snapshot, the computation its
conditions go through). A KL between conditions below that size is a statement about the arithmetic, not the edit.

The run's floor is the largest ``kl_floor`` of its firings (the rounding is not the same at every firing, and a
firing whose own two computations happened to agree closely is not more precise than the others: the bound is
the run's). ``below_floor`` flags a firing where any of its condition KLs (either direction) is at or below it;
the summary reports the floor and how many firings it flags. Records of the earlier protocol (no unedited rows)
have no ``kl_floor``: their floor is unknown (NaN) and nothing is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .records import CONDITIONS, kl_column

FLOOR_COLUMN = "kl_floor"
FLAG_COLUMN = "below_floor"


def run_floor(kl_floor: np.ndarray) -> float:
    """The run's floor: the largest finite per-firing floor (NaN when none is finite)."""
    finite = np.asarray(kl_floor, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.max()) if finite.size else float("nan")


def smallest_effect(records: pd.DataFrame) -> np.ndarray:
    """Per firing, the smallest of its condition KLs in either direction."""
    columns = [kl_column(c, reverse=r) for c in CONDITIONS for r in (False, True)]
    return records[columns].to_numpy(dtype=np.float64).min(axis=1)


def with_floor_flags(records: pd.DataFrame, kl_floor: np.ndarray) -> pd.DataFrame:
    """``records`` with the columns ``kl_floor`` (per firing) and ``below_floor`` (0/1 against the run's floor)."""
    kl_floor = np.asarray(kl_floor, dtype=np.float64)
    if len(kl_floor) != len(records):
        raise ValueError(f"{len(kl_floor)} floors for {len(records)} records")
    floor = run_floor(kl_floor)
    out = records.copy()
    out[FLOOR_COLUMN] = kl_floor
    flagged = smallest_effect(records) <= floor if np.isfinite(floor) else np.zeros(len(records), dtype=bool)
    out[FLAG_COLUMN] = flagged.astype(np.int64)
    return out


@dataclass(frozen=True)
class FloorSummary:
    """The run's numerical floor (``floor``: the largest per-firing ``kl_floor``; ``median``: their median) and the
    firings with a condition KL at or below it (``n_below`` of ``n_firings``)."""

    floor: float
    median: float
    n_below: int
    n_firings: int


def floor_summary(records: pd.DataFrame) -> FloorSummary | None:
    """The floor of a record table that has ``kl_floor`` (None for records without it); ``below_floor`` is
    recomputed from the table, so a subset of a run's records is judged against its own floor."""
    if FLOOR_COLUMN not in records.columns or len(records) == 0:
        return None
    values = records[FLOOR_COLUMN].to_numpy(dtype=np.float64)
    floor = run_floor(values)
    finite = values[np.isfinite(values)]
    n_below = int((smallest_effect(records) <= floor).sum()) if np.isfinite(floor) else 0
    return FloorSummary(floor=floor, median=float(np.median(finite)) if finite.size else float("nan"),
                        n_below=n_below, n_firings=len(records))
