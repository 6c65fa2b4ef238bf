"""Read every supported rating file into one canonical frame.

The frame has the columns ``user_id`` and ``item_id`` (pandas ``"string"``), ``rating``
(``float32``) and ``timestamp`` (``int64``, unix seconds), rows in file order, duplicates kept.
Each format is one row of ``_SPECS``; there is one code path for delimited text, one for JSON
lines and one for Parquet. Every problem with the input raises :class:`InputError` naming the
file and, where it applies, the 1-based line in the file (header included) and the column.
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from melo_dist.errors import InputError

CANONICAL = ("user_id", "item_id", "rating", "timestamp")
_POSITIONAL = ("0", "1", "2", "3")  # column names given to header-less files


@dataclass(frozen=True)
class _Spec:
    kind: str  # "text", "json" or "parquet"
    fields: tuple[str, ...] | None  # file names for CANONICAL; None: canonical or `columns`
    sep: str | None = ","  # text only; None: sniffed from the header
    header: bool = True  # text only
    dates: bool = False  # timestamps may also be date strings (read as UTC)


_SPECS: dict[str, _Spec] = {
    "ml-100k": _Spec("text", _POSITIONAL, sep="\t", header=False),
    "ml-1m": _Spec("text", _POSITIONAL, sep="::", header=False),
    "ml-csv": _Spec("text", ("userId", "movieId", "rating", "timestamp")),
    "amazon-json": _Spec("json", ("reviewerID", "asin", "overall", "unixReviewTime")),
    "amazon-csv": _Spec("text", _POSITIONAL, header=False),
    "melo-amazon-csv": _Spec("text", ("reviewerID", "product_id", "rating", "date"), dates=True),
    "yelp-json": _Spec("json", ("user_id", "business_id", "stars", "date"), dates=True),
    "melo-yelp-csv": _Spec("text", ("user_id", "business_id", "stars", "timestamp"), dates=True),
    "recbole-inter": _Spec("text", CANONICAL, sep="\t"),
    "csv": _Spec("text", None, sep=None, dates=True),
    "parquet": _Spec("parquet", None, dates=True),
}

FORMATS: dict[str, tuple[str, ...]] = {
    "movielens": ("ml-100k", "ml-1m", "ml-csv"),
    "amazon": ("amazon-json", "amazon-csv", "melo-amazon-csv"),
    "yelp": ("yelp-json", "melo-yelp-csv"),
    "recbole": ("recbole-inter",),
    "csv": ("csv",),
    "parquet": ("parquet",),
}
SOURCES: tuple[str, ...] = tuple(FORMATS)  # "synthetic" is generated elsewhere, never read

# errors the stdlib raises for unreadable, corrupt or truncated plain, gzip and zip files
_READ_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    zipfile.BadZipFile,
    RuntimeError,
    NotImplementedError,
)


def _family(source: str) -> tuple[str, ...]:
    if source not in FORMATS:
        raise InputError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    return FORMATS[source]


@contextmanager
def _open(path: Path) -> Iterator[IO[bytes]]:
    """The file as bytes: gunzipped for ``.gz``, the one JSON member of a ``.zip``."""
    name = path.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                members = [
                    m
                    for m in zf.namelist()
                    if m.lower().endswith((".json", ".jsonl")) and not m.startswith("__MACOSX/")
                ]
                if len(members) != 1:
                    raise InputError(
                        f"zip must hold exactly one .json file, found {len(members)}: "
                        f"{members or zf.namelist()}",
                        path=path,
                    )
                with zf.open(members[0]) as f:
                    yield f
        elif name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                yield f  # type: ignore[misc]
        else:
            with open(path, "rb") as f:
                yield f
    except _READ_ERRORS as e:
        kind = "zip" if name.endswith(".zip") else "gzip" if name.endswith(".gz") else "file"
        raise InputError(f"cannot read {kind}: {e}", path=path) from None


def _header_names(line: str, sep: str) -> list[str]:
    # RecBole headers carry a type suffix ("user_id:token"); accept it wherever a header is read
    return [n.strip().strip('"').split(":")[0] for n in line.split(sep)]


def _sniff_sep(line: str) -> str:
    return max([",", "\t", ";", "|"], key=line.count)


def _sniff(spec: _Spec, first: str) -> bool:
    """Whether a file whose first line is `first` looks like `spec`."""
    if spec.kind == "json":
        try:
            obj = json.loads(first)
        except ValueError:
            return False
        return isinstance(obj, dict) and all(k in obj for k in spec.fields or ())
    if spec.kind != "text" or spec.sep is None or spec.fields is None:
        return False
    if spec.header:
        return set(spec.fields) <= set(_header_names(first, spec.sep))
    parts = first.split(spec.sep)
    return len(parts) == 4 and all(_is_number(parts[i]) for i in (2, 3))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def detect_format(path: Path, source: str) -> str:
    """The format of `path` among those `source` accepts: by file name, then by its first line."""
    formats = _family(source)
    if len(formats) == 1:
        return formats[0]
    name = path.name.lower().removesuffix(".gz")
    hint = "ml-100k" if name == "u.data" else "ml-1m" if "ratings.dat" in name else None
    if hint in formats:
        return hint
    with _open(path) as f:  # the first non-blank line
        first = next((ln for ln in f if ln.strip()), b"").decode("utf-8-sig", "replace").strip()
    for fmt in formats:
        if _sniff(_SPECS[fmt], first):
            return fmt
    raise InputError(
        f"cannot tell the {source} format from the file name or first line {first[:60]!r}; "
        f"pass one of: {', '.join(formats)}",
        path=path,
    )


@dataclass(frozen=True)
class _Where:
    """Maps a row index to its place in the file for error messages."""

    path: Path
    lines: Sequence[int] | None  # 1-based file line of each row; None: no lines (Parquet)

    def error(self, message: str, row: int, column: str | None = None) -> InputError:
        if self.lines is None:
            return InputError(f"row {row + 1}: {message}", path=self.path, column=column)
        return InputError(message, path=self.path, line=self.lines[row], column=column)


def _missing(path: Path, wanted: tuple[str, ...], found: list[str]) -> None:
    missing = [w for w in wanted if w not in found]
    if missing:
        raise InputError(f"missing column(s) {missing}; found {found}", path=path)


def _read_text(path: Path, spec: _Spec, fields: tuple[str, ...]) -> tuple[pa.Table, _Where]:
    with _open(path) as f:
        data = f.read().removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n")
    if not data.strip():
        raise InputError("file is empty", path=path)
    sep = spec.sep
    if sep == "::":  # pyarrow wants a one-byte delimiter; ids never contain tabs
        data, sep = data.replace(b"::", b"\t"), "\t"
    if spec.header:
        head, newline, _ = data.partition(b"\n")
        first = head.decode("utf-8", errors="replace").rstrip("\r")
        sep = sep or _sniff_sep(first)
        names = _header_names(first, sep)
        _missing(path, fields, names)
        if not newline:
            raise InputError("no data rows after the header", path=path)
    else:
        names = list(_POSITIONAL)
    try:  # up front: arrow's bad-row callback cannot report undecodable text
        data.decode("utf-8")
    except UnicodeDecodeError as u:
        line = data.count(b"\n", 0, u.start) + 1
        raise InputError("text is not valid UTF-8", path=path, line=line) from None
    bad: list[pcsv.InvalidRow] = []

    def on_bad_row(row: pcsv.InvalidRow) -> str:
        bad.append(row)
        return "error"

    try:
        table = pcsv.read_csv(
            io.BytesIO(data),
            read_options=pcsv.ReadOptions(
                column_names=names, skip_rows=int(spec.header), use_threads=False
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=sep, ignore_empty_lines=False, invalid_row_handler=on_bad_row
            ),
            convert_options=pcsv.ConvertOptions(
                include_columns=list(fields), column_types=dict.fromkeys(fields, pa.string())
            ),
        )
    except pa.ArrowException as e:
        if bad:
            row, shown = bad[0], spec.sep or sep
            text = row.text.replace("\t", "::") if shown == "::" else row.text
            raise InputError(
                f"malformed line: expected {row.expected_columns} fields, found "
                f"{row.actual_columns} (separator {shown!r}): {text[:80]!r}",
                path=path,
                line=row.number,
            ) from None
        raise InputError(f"cannot parse: {str(e).splitlines()[0]}", path=path) from None
    first = 1 + int(spec.header)  # with empty lines kept, row i is line first + i
    return table.rename_columns(list(CANONICAL)), _Where(path, range(first, first + len(table)))


def _read_json(path: Path, spec: _Spec) -> tuple[pa.Table, _Where]:
    keys, rows, lines = spec.fields or CANONICAL, [], []
    with _open(path) as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                message = f"malformed JSON: {e.msg} at character {e.pos + 1}"
                raise InputError(message, path=path, line=no) from None
            except UnicodeDecodeError:
                raise InputError("text is not valid UTF-8", path=path, line=no) from None
            if not isinstance(obj, dict):
                raise InputError("expected a JSON object", path=path, line=no)
            missing = [k for k in keys if obj.get(k) is None]  # null counts as missing
            if missing:
                found = sorted(k for k, v in obj.items() if v is not None)
                raise InputError(
                    f"missing or null key(s) {missing}; found {found}", path=path, line=no
                )
            rows.append([str(obj[k]) for k in keys])
            lines.append(no)
    if not rows:
        raise InputError("file is empty (no JSON lines)", path=path)
    table = pa.table({c: pa.array(col, pa.string()) for c, col in zip(CANONICAL, zip(*rows))})
    return table, _Where(path, lines)


def _read_parquet(path: Path, fields: tuple[str, ...]) -> tuple[pa.Table, _Where]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"not a readable Parquet file: {e}", path=path) from None
    table = table.rename_columns([n.split(":")[0] for n in table.column_names])
    _missing(path, fields, table.column_names)
    return table.select(list(fields)).rename_columns(list(CANONICAL)), _Where(path, None)


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _ids(col: pa.ChunkedArray, name: str, where: _Where) -> pa.ChunkedArray:
    col = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    empty = pc.fill_null(pc.equal(pc.utf8_length(col), 0), True).to_numpy(zero_copy_only=False)
    if (row := _first(empty)) is not None:
        raise where.error(f"empty {name.replace('_', ' ')}", row, name)
    return col


def _date_seconds(text: pd.Series, fmt: str) -> pd.Series:
    stamps = pd.to_datetime(text, errors="coerce", utc=True, format=fmt)
    return (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds()


def _floats(col: pa.ChunkedArray, name: str, where: _Where, dates: bool = False) -> np.ndarray:
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


def _ratings(col: pa.ChunkedArray, where: _Where, lo: float, hi: float) -> np.ndarray:
    values = _floats(col, "rating", where)
    if (row := _first(np.isnan(values))) is not None:
        raise where.error("missing rating", row, "rating")
    if (row := _first((values < lo) | (values > hi))) is not None:
        raise where.error(
            f"rating {values[row]:g} outside the range [{lo:g}, {hi:g}]", row, "rating"
        )
    return values.astype(np.float32)


def _timestamps(col: pa.ChunkedArray, where: _Where, dates: bool) -> np.ndarray:
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
    formats = _family(source)
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
    spec = _SPECS[fmt]
    if columns and spec.fields:
        raise InputError(
            f"a column mapping applies to the csv and parquet formats, not {fmt!r}", path=path
        )
    fields = spec.fields or tuple((columns or {}).get(c, c) for c in CANONICAL)
    if len(set(fields)) < len(fields):
        raise InputError(f"columns maps two canonical names to one column: {columns}")
    if spec.kind == "text":
        table, where = _read_text(path, spec, fields)
    elif spec.kind == "json":
        table, where = _read_json(path, spec)
    else:
        table, where = _read_parquet(path, fields)
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
