"""Folders at a URI (`s3://`, `gs://`, `hdfs://`, `file://`) as well as plain paths.

Everything that reads or writes a folder works on a local one; for a URI this module supplies
it through `pyarrow.fs`:
- a prepared dataset at a URI is copied once into a local cache, keyed by its manifest's hash,
  by every process that reads it (Ray workers on other nodes fetch their own copy, so they
  need no shared mount);
- a file read at a URI (`prepare --path`, a checkpoint) is copied to a local file first;
- a folder written at a URI (`prepare --out`, `run.out`) is written in a local working copy
  and copied up with `push`: last.pt before best.pt, and the manifest or the metrics record
  last, so a reader never sees a half-written dataset or a record ahead of its checkpoint.
  Ray's own checkpoints in a run folder (`ray-checkpoints/`) are Ray's to read and write at
  the URI: they are never copied down or up.
Failures of the storage (no such bucket, no credentials, the network) are `InputError`s
naming the URI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial, wraps
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from melo_dist.errors import InputError

NOT_COPIED = ("ray-checkpoints",)  # Ray's, read and written by Ray at the URI itself
PUSH_ORDER = {"last.pt": 1, "best.pt": 2, "metrics.jsonl": 3, "manifest.json": 3}  # else 0


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def normalised(path: str) -> str:
    """One spelling of a URI (no trailing slash), so it names one run; plain paths as given."""
    return path.rstrip("/") if is_uri(path) else path


def cache_dir() -> Path:
    """$MELO_DIST_CACHE, else ~/.cache/melo-dist: local copies of folders at URIs."""
    return Path(os.environ.get("MELO_DIST_CACHE", Path.home() / ".cache" / "melo-dist"))


def storage_errors(function: Callable) -> Callable:
    """The storage's own failures (OSError: access denied, no bucket, ...) as InputErrors
    naming the URI, the function's first argument."""

    @wraps(function)
    def checked(uri, *args, **kwargs):
        try:
            return function(uri, *args, **kwargs)
        except (pa.ArrowInvalid, OSError) as error:
            raise InputError(f"storage error: {error}", path=uri) from None

    return checked


@storage_errors
def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, root = pafs.FileSystem.from_uri(str(uri))
    return fs, root.rstrip("/")


@storage_errors
def read_bytes(uri: str, name: str) -> bytes | None:
    """The file `name` in the folder at `uri`; None when there is none."""
    fs, root = filesystem(uri)
    if fs.get_file_info(f"{root}/{name}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/{name}") as stream:
        return stream.read()


@storage_errors
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
    with tempfile.TemporaryDirectory(prefix="melo-input-") as folder:
        local = fetch(str(path), Path(folder))
        try:
            yield local
        except InputError as error:  # name the file at the URI, not its copy
            if error.path is None or Path(error.path) != local:
                raise
            raise InputError(
                error.message, path=path, line=error.line, column=error.column
            ) from None


@storage_errors
def fetch(uri: str, folder: Path) -> Path:
    """Copy the file at `uri` into `folder` under its own name, atomically: a concurrent
    reader of that local file sees the old copy or the new one."""
    fs, name = filesystem(uri)
    if fs.get_file_info(name).type != pafs.FileType.File:
        raise InputError("file not found", path=uri)
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / name.rsplit("/", 1)[-1]
    handle, partial = tempfile.mkstemp(prefix=f".{local.name}.", dir=folder)
    try:
        with fs.open_input_stream(name) as source, os.fdopen(handle, "wb") as sink:
            shutil.copyfileobj(source, sink)
        os.replace(partial, local)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return local


def fetched_file(uri: str) -> Path:
    """A local copy of the file at `uri`, refreshed on every call (a checkpoint changes)."""
    return fetch(uri, cache_dir() / "files" / hashlib.sha256(uri.encode()).hexdigest()[:16])


@storage_errors
def exists(uri: str, name: str) -> bool:
    fs, root = filesystem(uri)
    return fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File


def local_folder(path: str | Path) -> Path:
    """The local folder written for `path`: the path itself, or for a URI its working copy."""
    if not is_uri(path):
        return Path(path)
    key = hashlib.sha256(normalised(str(path)).encode()).hexdigest()[:16]
    return cache_dir() / "folders" / key


def checked_out(path: str | Path) -> Path:
    """`local_folder(path)`, for a URI freshly pulled from it (an earlier run's files there)."""
    local = local_folder(path)
    if is_uri(path):
        shutil.rmtree(local, ignore_errors=True)
        pull(str(path), local)
    return local


def publish(path: str | Path, log: Callable[[str], None] | None = None) -> None:
    """Push the working copy of `path` up to it (nothing to do for a plain path). With `log`,
    a failure is reported there and training goes on (the next push sends everything again)."""
    if not is_uri(path):
        return
    try:
        push(local_folder(path), str(path))
    except InputError as error:
        if log is None:
            raise
        log(f"{error}; the run folder is copied there again at the next checkpoint")


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a temporary file in the same folder, fsync it, rename it onto `path`, fsync the
    folder: after a crash (kill, power loss, full disk) `path` is the old file or the new one,
    never a torn one, and no temporary file is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@storage_errors
def pull(uri: str, local: Path) -> None:
    """Copy the folder at `uri` (if there is one) into `local`, but not Ray's checkpoints."""
    fs, root = filesystem(uri)
    local.mkdir(parents=True, exist_ok=True)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        relative = info.path[len(root) + 1 :]
        if info.type != pafs.FileType.File or relative.split("/", 1)[0] in NOT_COPIED:
            continue
        (local / relative).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as source, (local / relative).open("wb") as sink:
            shutil.copyfileobj(source, sink)


@storage_errors
def push(local: Path, uri: str) -> None:
    """Copy the files of `local` up to the folder at `uri` (`PUSH_ORDER`), not Ray's."""
    fs, root = filesystem(uri)
    files = [
        p
        for p in sorted(local.rglob("*"))
        if p.is_file()
        and not p.name.startswith(".")
        and p.relative_to(local).parts[0] not in NOT_COPIED
    ]
    for file in sorted(files, key=lambda p: PUSH_ORDER.get(p.name, 0)):
        target = f"{root}/{file.relative_to(local).as_posix()}"
        with file.open("rb") as source:
            if isinstance(fs, pafs.LocalFileSystem):  # an object store writes whole objects;
                write_atomically(target, partial(shutil.copyfileobj, source))  # a file system
                continue  # needs a temporary file and a rename
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with fs.open_output_stream(target) as sink:
                shutil.copyfileobj(source, sink)


@storage_errors
def is_empty(uri: str) -> bool:
    """Whether the folder at `uri` is missing or holds nothing."""
    fs, root = filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return True
    if info.type != pafs.FileType.Directory:
        raise InputError("output path exists and is not a folder", path=uri)
    return not fs.get_file_info(pafs.FileSelector(root, recursive=False))


@storage_errors
def subfolders(uri: str, prefix: str) -> list[str]:
    """The URIs of the folders in the folder at `uri` whose names start with `prefix`, sorted."""
    fs, root = filesystem(uri)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = sorted(
        e.base_name
        for e in entries
        if e.type == pafs.FileType.Directory and e.base_name.startswith(prefix)
    )
    return [f"{str(uri).rstrip('/')}/{name}" for name in names]


@storage_errors
def clear(uri: str) -> None:
    fs, root = filesystem(uri)
    fs.delete_dir_contents(root, missing_dir_ok=True)
