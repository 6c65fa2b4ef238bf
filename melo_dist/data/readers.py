"""Read every supported rating file into one canonical frame.

The frame has the columns ``user_id`` and ``item_id`` (pandas ``"string"``), ``rating``
(``float32``) and ``timestamp`` (``int64``, unix seconds), rows in file order, duplicates kept.
Formats and their detection live in `formats.py`, the parsers in `parsers.py`; this module
checks and converts the columns. Every problem with the input raises :class:`InputError` naming
the file and, where it applies, the 1-based line in the file (header included) and the column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from melo_dist.data.formats import CANONICAL, SPECS, detect_format, family
from melo_dist.data.parsers import Where, read_json, read_parquet, read_text
from melo_dist.errors import InputError


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _ids(col: pa.ChunkedArray, name: str, where: Where) -> pa.ChunkedArray:
    col = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    empty = pc.fill_null(pc.equal(pc.utf8_length(col), 0), True).to_numpy(zero_copy_only=False)
    if (row := _first(empty)) is not None:
        raise where.error(f"empty {name.replace('_', ' ')}", row, name)
    return col


def _date_seconds(text: pd.Series, fmt: str) -> pd.Series:
    stamps = pd.to_datetime(text, errors="coerce", utc=True, format=fmt)
    return (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds()


def _floats(col: pa.ChunkedArray, name: str, where: Where, dates: bool = False) -> np.ndarray:
    """Numbers as float64 (NaN where missing); with `dates`, date strings become unix seconds."""
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        col = pc.cast(col, pa.timestamp("s", tz=getattr(col.type, "tz", None)), safe=False)
        return pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64)
    try:  # fast path: every value is a plain number
        return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowException:
        pass
    text = pd.Series(col.to_pylist(), dtype=object).fillna("").astype(str).str.strip()
    values = pd.to_numeric(text, errors="coerce").astype("float64")
    todo = values.isna() & ~text.str.lower().isin(["", "nan"])
    if dates and todo.any():
        values[todo] = _date_seconds(text[todo], "ISO8601")
        retry = todo & values.isna()
        if retry.any():  # other spellings, e.g. "02 28, 2014": slower, so only where needed
            values[retry] = _date_seconds(text[retry], "mixed")
        todo &= values.isna()
    if (row := _first(todo.to_numpy())) is not None:
        kind = "a number or a date" if dates else "a number"
        raise where.error(f"{text.iloc[row]!r} is not {kind}", row, name)
    return values.to_numpy()


def _ratings(col: pa.ChunkedArray, where: Where, lo: float, hi: float) -> np.ndarray:
    values = _floats(col, "rating", where)
    if (row := _first(np.isnan(values))) is not None:
        raise where.error("missing rating", row, "rating")
    if (row := _first((values < lo) | (values > hi))) is not None:
        raise where.error(
            f"rating {values[row]:g} outside the range [{lo:g}, {hi:g}]", row, "rating"
        )
    return values.astype(np.float32)


def _timestamps(col: pa.ChunkedArray, where: Where, dates: bool) -> np.ndarray:
    values = None
    if not (pa.types.is_timestamp(col.type) or pa.types.is_date(col.type)):
        try:  # fast path: unix seconds written as integers, none missing
            ints = pc.cast(col, pa.int64())
            values = ints.to_numpy() if ints.null_count == 0 else None
        except pa.ArrowException:
            pass
    if values is None:
        seconds = _floats(col, "timestamp", where, dates)
        if (row := _first(~(np.abs(seconds) < 1e15))) is not None:  # NaN, inf or int64 overflow
            value = seconds[row]
            problem = (
                "missing timestamp" if np.isnan(value) else f"timestamp {value:g} out of range"
            )
            raise where.error(problem, row, "timestamp")
        values = np.floor(seconds).astype(np.int64)
    if (row := _first(values < 0)) is not None:
        raise where.error(f"negative timestamp {values[row]}", row, "timestamp")
    return values


def read_ratings(
    path: str | Path,
    source: str,
    fmt: str | None = None,
    columns: dict[str, str] | None = None,
    rating_range: tuple[float, float] = (0.5, 5.0),
) -> tuple[pd.DataFrame, str]:
    """Read a rating file of the `source` family; returns (canonical frame, format name used).

    `fmt` overrides detection. `columns` maps canonical names to the file's column names for the
    generic ``csv`` and ``parquet`` formats (missing keys default to the canonical name).
    """
    path = Path(path).expanduser()
    formats = family(source)
    if fmt is not None and fmt not in formats:
        raise InputError(
            f"format {fmt!r} is not a {source} format; use one of: {', '.join(formats)}", path=path
        )
    if not path.is_file():
        raise InputError("file not found" if not path.exists() else "not a file", path=path)
    if path.stat().st_size == 0:
        raise InputError("file is empty", path=path)
    lo, hi = rating_range
    if not lo <= hi:
        raise InputError(f"rating_range {rating_range} has min > max")
    if unknown := sorted(set(columns or {}) - set(CANONICAL)):
        raise InputError(f"unknown key(s) {unknown} in columns; use {list(CANONICAL)}")
    fmt = fmt or detect_format(path, source)
    spec = SPECS[fmt]
    if columns and spec.fields:
        raise InputError(
            f"a column mapping applies to the csv and parquet formats, not {fmt!r}", path=path
        )
    fields = spec.fields or tuple((columns or {}).get(c, c) for c in CANONICAL)
    if len(set(fields)) < len(fields):
        raise InputError(f"columns maps two canonical names to one column: {columns}")
    if spec.kind == "text":
        table, where = read_text(path, spec, fields)
    elif spec.kind == "json":
        table, where = read_json(path, spec)
    else:
        table, where = read_parquet(path, fields)
    if table.num_rows == 0:
        raise InputError("no data rows", path=path)
    try:
        users, items = (_ids(table[c], c, where) for c in ("user_id", "item_id"))
        ratings = _ratings(table["rating"], where, lo, hi)
        stamps = _timestamps(table["timestamp"], where, spec.dates)
    except pa.ArrowException as e:  # e.g. a Parquet column of lists: no row to blame
        raise InputError(f"cannot convert: {str(e).splitlines()[0]}", path=path) from None
    out = pa.table([users, items, ratings, stamps], names=list(CANONICAL))
    frame = out.to_pandas(types_mapper={pa.string(): pd.StringDtype()}.get)
    return frame, fmt
