"""The per-firing record table of the substitution test, and saving it safely.

One row per firing: a pool feature fired at (passage, position) of cell (layer, head), the native write was
removed and the three conditions of paper §3.3 were continued to the output distribution:

    atom    S_t - Δ_nat + c_atom · A_{i*}     (the dominant atom i*, coefficient c_atom)
    delete  S_t - Δ_nat
    random  S_t - Δ_nat + c_rand · R          (a matched-norm random rank-1 write)

Columns (`RECORD_COLUMNS`, in this order; extra columns are allowed and kept):

    passage, position          int    where the firing is (passage id, token index t)
    layer, head                int    the cell
    feature                    int    the pool feature whose firing selected the position
    atom                       int    the atom substituted (i* in the pooled test, the tested atom in the per-atom test)
    coefficient                float  the scale c_atom actually used
    native_write_norm          float  ‖Δ_nat‖_F
    kl_atom, kl_delete, kl_random               float  KL(p_native ‖ p_condition)   (the authors' helper; see below)
    kl_atom_rev, kl_delete_rev, kl_random_rev   float  KL(p_condition ‖ p_native)   (the paper text's direction)
    top1_native, top1_atom, top1_delete, top1_random   int    top-1 token id under each cache state

KL direction: the paper writes KL(p_patched ‖ p_baseline) but the authors' code computes KL(p_native ‖ p_cond)
(paper-method §3.4, §11.20). The unsuffixed columns hold the code's direction; `_rev` holds the other one. Use
`kl_column(condition, reverse=...)` rather than spelling column names by hand.

Build a table from `FiringRecord`s with `records_frame`, or check any DataFrame with `validate_records`.
`save_records` / `load_records` write parquet (when pyarrow is installed) or CSV, never half-written files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ..outputs import apply_umask

CONDITIONS: tuple[str, ...] = ("atom", "delete", "random")
"""The edited conditions of the substitution test, in the order of the paper's strict chain."""


@dataclass(frozen=True)
class FiringRecord:
    """One firing of the substitution test (one row of the record table). Field meanings: module docstring."""

    passage: int
    position: int
    layer: int
    head: int
    feature: int
    atom: int
    coefficient: float
    native_write_norm: float
    kl_atom: float
    kl_delete: float
    kl_random: float
    kl_atom_rev: float
    kl_delete_rev: float
    kl_random_rev: float
    top1_native: int
    top1_atom: int
    top1_delete: int
    top1_random: int


RECORD_COLUMNS: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(FiringRecord))
INTEGER_COLUMNS: tuple[str, ...] = tuple(
    field.name for field in dataclasses.fields(FiringRecord) if field.type in (int, "int")
)
FLOAT_COLUMNS: tuple[str, ...] = tuple(name for name in RECORD_COLUMNS if name not in INTEGER_COLUMNS)


def kl_column(condition: str, *, reverse: bool = False) -> str:
    """Column of the KL of `condition`: `kl_<condition>` = KL(p_native ‖ p_cond), `kl_<condition>_rev` the other."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITIONS}")
    return f"kl_{condition}_rev" if reverse else f"kl_{condition}"


def top1_column(condition: str) -> str:
    """Column name of the top-1 token id under `condition` ("native" or one of `CONDITIONS`)."""
    if condition != "native" and condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; expected 'native' or one of {CONDITIONS}")
    return f"top1_{condition}"


def empty_records() -> pd.DataFrame:
    """A record table with every column and no rows (int64 / float64 dtypes)."""
    return pd.DataFrame(
        {name: pd.Series([], dtype=np.int64 if name in INTEGER_COLUMNS else np.float64) for name in RECORD_COLUMNS}
    )


def records_frame(firings: Iterable[FiringRecord]) -> pd.DataFrame:
    """The record table of `firings`, one row each, with canonical dtypes (built column by column: a
    `FiringRecord` holds plain ints and floats, so nothing needs the checks of `validate_records`)."""
    firings = list(firings)
    if not firings:
        return empty_records()
    return pd.DataFrame({
        name: np.fromiter((getattr(firing, name) for firing in firings), count=len(firings),
                          dtype=np.int64 if name in INTEGER_COLUMNS else np.float64)
        for name in RECORD_COLUMNS
    })


def validate_records(records: pd.DataFrame) -> pd.DataFrame:
    """Check that `records` has every record column with a usable dtype; return a copy with canonical dtypes.

    Integer columns become int64 (floats are accepted only if every value is integral), float columns become
    float64. Required columns come first, in `RECORD_COLUMNS` order, then any extra columns as they were.
    NaN KLs are allowed here (a failed firing can still be stored); the statistics refuse them.

    Raises:
        KeyError: naming every missing column.
        TypeError: naming every column whose values cannot be converted.
    """
    if not isinstance(records, pd.DataFrame):
        raise TypeError(f"records must be a pandas DataFrame, got {type(records).__name__}")
    missing = [name for name in RECORD_COLUMNS if name not in records.columns]
    if missing:
        raise KeyError(f"records are missing required columns {missing}; expected all of {list(RECORD_COLUMNS)}")

    converted: dict[str, pd.Series] = {}
    bad_columns: list[str] = []
    for name in RECORD_COLUMNS:
        column = records[name]
        try:
            converted[name] = _as_integer_column(column) if name in INTEGER_COLUMNS else _as_float_column(column)
        except (TypeError, ValueError):
            bad_columns.append(f"{name} ({column.dtype})")
    if bad_columns:
        raise TypeError(
            f"record columns with unusable values: {bad_columns}; integer columns need integral values without NaN "
            f"({list(INTEGER_COLUMNS)}), the others need numbers"
        )
    extras = {name: records[name] for name in records.columns if name not in converted}
    return pd.DataFrame({**converted, **extras}, index=records.index)


def _as_integer_column(column: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
        raise TypeError(column.name)
    if pd.api.types.is_integer_dtype(column):
        if column.isna().any():  # nullable integer dtypes
            raise ValueError(column.name)
        return column.astype(np.int64)
    values = column.to_numpy(dtype=np.float64)
    if not (np.isfinite(values).all() and (values == np.round(values)).all()):
        raise ValueError(column.name)
    return column.astype(np.int64)


def _as_float_column(column: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
        raise TypeError(column.name)
    return column.astype(np.float64)


# --- saving and loading -------------------------------------------------------------------------------------------


def pyarrow_available() -> bool:
    """Whether pandas can write parquet here (pyarrow installed)."""
    return importlib.util.find_spec("pyarrow") is not None


def write_atomically(path: str | Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Call `write(temporary_path)` in `path`'s directory, then move the finished file onto `path`.

    A reader never sees a half-written `path`: the move is a rename within one directory. On any error the
    temporary file is removed. Without `overwrite`, an existing `path` is refused (checked before writing and
    again atomically when the file is put in place, where the filesystem supports hard links).

    Returns:
        `path` as a `Path`.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        write(temporary)
        apply_umask(temporary)  # mkstemp creates 0600: give the file the user's umask
        if overwrite:
            os.replace(temporary, target)
        else:
            _move_without_overwriting(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def _move_without_overwriting(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # fails atomically if target exists
    except FileExistsError:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it") from None
    except OSError:  # filesystem without hard links: the earlier existence check is all we have
        if target.exists():
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it") from None
        os.replace(source, target)


def save_records(
    records: pd.DataFrame,
    path: str | Path,
    *,
    overwrite: bool = False,
    file_format: Literal["auto", "parquet", "csv"] = "auto",
) -> Path:
    """Validate `records` and write them to `path`; return the path.

    `file_format="auto"` picks from the suffix (`.parquet` or `.csv`), and for any other suffix parquet when
    pyarrow is installed, else CSV. Writes go to a temporary file that is renamed into place. An existing file
    is refused unless `overwrite=True`.
    """
    table = validate_records(records)
    chosen = _resolve_format(Path(path), file_format)

    def write(temporary: Path) -> None:
        if chosen == "parquet":
            table.to_parquet(temporary, index=False, engine="pyarrow")
        else:
            table.to_csv(temporary, index=False)

    return write_atomically(path, write, overwrite=overwrite)


def load_records(path: str | Path) -> pd.DataFrame:
    """Read a record table written by `save_records` (parquet or CSV, recognised by content) and validate it."""
    source = Path(path)
    with source.open("rb") as handle:
        is_parquet = handle.read(4) == b"PAR1"
    if is_parquet:
        if not pyarrow_available():
            raise ImportError(f"{source} is a parquet file; install pyarrow to read it")
        table = pd.read_parquet(source, engine="pyarrow")
    else:
        exact_floats = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
        table = pd.read_csv(source, **exact_floats)  # pandas >= 3 parses floats round-trip by default
    return validate_records(table)


def _resolve_format(path: Path, file_format: str) -> str:
    if file_format not in ("auto", "parquet", "csv"):
        raise ValueError(f"file_format must be 'auto', 'parquet' or 'csv', got {file_format!r}")
    if file_format == "auto":
        suffix = path.suffix.lower()
        file_format = "csv" if suffix == ".csv" else "parquet" if suffix == ".parquet" else None
        if file_format is None:
            file_format = "parquet" if pyarrow_available() else "csv"
    if file_format == "parquet" and not pyarrow_available():
        raise ImportError("writing parquet needs pyarrow; install it or save with a .csv path / file_format='csv'")
    return file_format
