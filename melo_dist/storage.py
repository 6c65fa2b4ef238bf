"""Folders at a URI (`s3://`, `gs://`, `hdfs://`, `file://`) as well as plain paths.

Everything that reads or writes a folder works on a local one; for a URI this module supplies
it through `pyarrow.fs`:
- a prepared dataset at a URI is copied once into a local cache, keyed by its manifest's hash,
  by every process that reads it (Ray workers on other nodes fetch their own copy, so they
  need no shared mount);
- a file read at a URI (`prepare --path`) is copied to a temporary file first;
- a folder written at a URI (`prepare --out`, `run.out`) is written in a local working copy
  and copied up with `push`; the manifest or the metrics record goes last, so a reader never
  sees a half-written dataset or a metrics record ahead of its checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from melo_dist.errors import InputError

LAST_FILES = ("manifest.json", "metrics.jsonl")  # pushed after everything else


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def cache_dir() -> Path:
    """$MELO_DIST_CACHE, else ~/.cache/melo-dist: local copies of folders at URIs."""
    return Path(os.environ.get("MELO_DIST_CACHE", Path.home() / ".cache" / "melo-dist"))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError) as error:  # unknown scheme, no credentials, ...
        raise InputError(f"cannot open this URI: {error}", path=uri) from None


def read_bytes(uri: str, name: str) -> bytes | None:
    """The file `name` in the folder at `uri`; None when there is none."""
    fs, root = filesystem(uri)
    path = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as stream:
        return stream.read()


def local_dataset(path: str | Path) -> Path:
    """A local folder holding the prepared dataset at `path`: the path itself, or for a URI a
    copy in the cache (fetched once per manifest; a concurrent fetch of the same one is fine)."""
    if not is_uri(path):
        return Path(path)
    manifest = read_bytes(str(path), "manifest.json")
    if manifest is None:
        raise InputError(
            "not a prepared dataset (no manifest.json); run `melo-dist prepare`", path=path
        )
    datasets = cache_dir() / "datasets"
    local = datasets / hashlib.sha256(manifest).hexdigest()[:16]
    if (local / "manifest.json").is_file():
        return local
    datasets.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=datasets))
    try:
        pull(str(path), staging)
        if (staging / "manifest.json").read_bytes() != manifest:
            raise InputError("the dataset changed while it was being copied; retry", path=path)
        try:
            staging.rename(local)
        except OSError:  # another process got there first: use its copy
            if not (local / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


@contextmanager
def local_file(path: str | Path) -> Iterator[Path]:
    """A local path for the file at `path`: the path itself, or for a URI a temporary copy
    under the same name (readers recognise formats by it), removed afterwards."""
    if not is_uri(path):
        yield Path(path)
        return
    fs, name = filesystem(str(path))
    if fs.get_file_info(name).type != pafs.FileType.File:
        raise InputError("file not found", path=path)
    with tempfile.TemporaryDirectory(prefix="melo-input-") as folder:
        local = Path(folder) / name.rstrip("/").rsplit("/", 1)[-1]
        with fs.open_input_stream(name) as source, local.open("wb") as sink:
            shutil.copyfileobj(source, sink)
        try:
            yield local
        except InputError as error:  # name the file at the URI, not its copy
            if error.path is None or Path(error.path) != local:
                raise
            raise InputError(
                error.message, path=path, line=error.line, column=error.column
            ) from None


def local_folder(path: str | Path) -> Path:
    """The local folder written for `path`: the path itself, or for a URI its working copy."""
    if not is_uri(path):
        return Path(path)
    return cache_dir() / "folders" / hashlib.sha256(str(path).encode()).hexdigest()[:16]


def checked_out(path: str | Path) -> Path:
    """`local_folder(path)`, for a URI freshly pulled from it (an earlier run's files there)."""
    local = local_folder(path)
    if is_uri(path):
        shutil.rmtree(local, ignore_errors=True)
        pull(str(path), local)
    return local


def publish(path: str | Path) -> None:
    """Push the working copy of `path` up to it (nothing to do for a plain path)."""
    if is_uri(path):
        push(local_folder(path), str(path))


def pull(uri: str, local: Path) -> None:
    """Copy the folder at `uri` (if there is one) into `local`."""
    fs, root = filesystem(uri)
    local.mkdir(parents=True, exist_ok=True)
    if fs.get_file_info(root).type == pafs.FileType.Directory:
        local_fs = pafs.LocalFileSystem()
        pafs.copy_files(root, str(local), source_filesystem=fs, destination_filesystem=local_fs)


def push(local: Path, uri: str) -> None:
    """Copy the files of `local` up to the folder at `uri`, the manifest and metrics last."""
    fs, root = filesystem(uri)
    files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
    files.sort(key=lambda p: p.name in LAST_FILES)
    for file in files:
        target = f"{root.rstrip('/')}/{file.relative_to(local).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with file.open("rb") as source, fs.open_output_stream(target) as sink:
            shutil.copyfileobj(source, sink)


def is_empty(uri: str) -> bool:
    """Whether the folder at `uri` is missing or holds nothing."""
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return True
    return not fs.get_file_info(pafs.FileSelector(root, recursive=False))


def clear(uri: str) -> None:
    fs, root = filesystem(uri)
    fs.delete_dir_contents(root, missing_dir_ok=True)
