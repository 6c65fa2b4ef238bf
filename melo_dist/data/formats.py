"""The rating-file formats melo-dist reads: one registry row per format, the source families
that group them, decompression, and format detection from the file name and first line.

Adding a format is one `Spec` row in `SPECS` (and its family in `FORMATS`); the parsers in
`parsers.py` read every format of a kind (delimited text, JSON lines, Parquet).
"""

from __future__ import annotations

import gzip
import json
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from melo_dist.errors import InputError

CANONICAL = ("user_id", "item_id", "rating", "timestamp")
POSITIONAL = ("0", "1", "2", "3")  # column names given to header-less files


@dataclass(frozen=True)
class Spec:
    kind: str  # "text", "json" or "parquet"
    fields: tuple[str, ...] | None  # file names for CANONICAL; None: canonical or `columns`
    sep: str | None = ","  # text only; None: sniffed from the header
    header: bool = True  # text only
    dates: bool = False  # timestamps may also be date strings (read as UTC)


SPECS: dict[str, Spec] = {
    "ml-100k": Spec("text", POSITIONAL, sep="\t", header=False),
    "ml-1m": Spec("text", POSITIONAL, sep="::", header=False),
    "ml-csv": Spec("text", ("userId", "movieId", "rating", "timestamp")),
    "amazon-json": Spec("json", ("reviewerID", "asin", "overall", "unixReviewTime")),
    "amazon-csv": Spec("text", POSITIONAL, header=False),
    "melo-amazon-csv": Spec("text", ("reviewerID", "product_id", "rating", "date"), dates=True),
    "yelp-json": Spec("json", ("user_id", "business_id", "stars", "date"), dates=True),
    "melo-yelp-csv": Spec("text", ("user_id", "business_id", "stars", "timestamp"), dates=True),
    "recbole-inter": Spec("text", CANONICAL, sep="\t"),
    "csv": Spec("text", None, sep=None, dates=True),
    "parquet": Spec("parquet", None, dates=True),
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
READ_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    zipfile.BadZipFile,
    RuntimeError,
    NotImplementedError,
)


def family(source: str) -> tuple[str, ...]:
    if source not in FORMATS:
        raise InputError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    return FORMATS[source]


@contextmanager
def open_bytes(path: Path) -> Iterator[IO[bytes]]:
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
    except READ_ERRORS as e:
        kind = "zip" if name.endswith(".zip") else "gzip" if name.endswith(".gz") else "file"
        raise InputError(f"cannot read {kind}: {e}", path=path) from None


def header_names(line: str, sep: str) -> list[str]:
    # RecBole headers carry a type suffix ("user_id:token"); accept it wherever a header is read
    return [n.strip().strip('"').split(":")[0] for n in line.split(sep)]


def sniff_sep(line: str) -> str:
    return max([",", "\t", ";", "|"], key=line.count)


def sniff(spec: Spec, first: str) -> bool:
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
        return set(spec.fields) <= set(header_names(first, spec.sep))
    parts = first.split(spec.sep)
    return len(parts) == 4 and all(is_number(parts[i]) for i in (2, 3))


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def detect_format(path: Path, source: str) -> str:
    """The format of `path` among those `source` accepts: by file name, then by its first line."""
    formats = family(source)
    if len(formats) == 1:
        return formats[0]
    name = path.name.lower().removesuffix(".gz")
    hint = "ml-100k" if name == "u.data" else "ml-1m" if "ratings.dat" in name else None
    if hint in formats:
        return hint
    with open_bytes(path) as f:  # the first non-blank line
        first = next((ln for ln in f if ln.strip()), b"").decode("utf-8-sig", "replace").strip()
    for fmt in formats:
        if sniff(SPECS[fmt], first):
            return fmt
    raise InputError(
        f"cannot tell the {source} format from the file name or first line {first[:60]!r}; "
        f"pass one of: {', '.join(formats)}",
        path=path,
    )
