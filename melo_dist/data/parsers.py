"""Parsers: one per kind of rating file (delimited text, JSON lines, Parquet), each returning
the four canonical columns as strings and where each row sits in the file, for errors that
name the line."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from melo_dist.data.formats import CANONICAL, POSITIONAL, Spec, header_names, open_bytes, sniff_sep
from melo_dist.errors import InputError


@dataclass(frozen=True)
class Where:
    """Maps a row index to its place in the file for error messages."""

    path: Path
    lines: Sequence[int] | None  # 1-based file line of each row; None: no lines (Parquet)

    def error(self, message: str, row: int, column: str | None = None) -> InputError:
        if self.lines is None:
            return InputError(f"row {row + 1}: {message}", path=self.path, column=column)
        return InputError(message, path=self.path, line=self.lines[row], column=column)


def require_columns(path: Path, wanted: tuple[str, ...], found: list[str]) -> None:
    missing = [w for w in wanted if w not in found]
    if missing:
        raise InputError(f"missing column(s) {missing}; found {found}", path=path)


def read_text(path: Path, spec: Spec, fields: tuple[str, ...]) -> tuple[pa.Table, Where]:
    with open_bytes(path) as f:
        data = f.read().removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n")
    if not data.strip():
        raise InputError("file is empty", path=path)
    sep = spec.sep
    if sep == "::":  # pyarrow wants a one-byte delimiter; ids never contain tabs
        data, sep = data.replace(b"::", b"\t"), "\t"
    if spec.header:
        head, newline, _ = data.partition(b"\n")
        first = head.decode("utf-8", errors="replace").rstrip("\r")
        sep = sep or sniff_sep(first)
        names = header_names(first, sep)
        require_columns(path, fields, names)
        if not newline:
            raise InputError("no data rows after the header", path=path)
    else:
        names = list(POSITIONAL)
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
    return table.rename_columns(list(CANONICAL)), Where(path, range(first, first + len(table)))


def read_json(path: Path, spec: Spec) -> tuple[pa.Table, Where]:
    keys, rows, lines = spec.fields or CANONICAL, [], []
    with open_bytes(path) as f:
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
    return table, Where(path, lines)


def read_parquet(path: Path, fields: tuple[str, ...]) -> tuple[pa.Table, Where]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"not a readable Parquet file: {e}", path=path) from None
    table = table.rename_columns([n.split(":")[0] for n in table.column_names])
    require_columns(path, fields, table.column_names)
    return table.select(list(fields)).rename_columns(list(CANONICAL)), Where(path, None)
