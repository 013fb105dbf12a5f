"""Where corpus files live: local paths, and any filesystem pyarrow or fsspec reaches.

A source path is a local path, directory or glob, or a URI of the same: ``s3://bucket/chat/*.jsonl``,
``gs://...``, ``hf://datasets/<id>/data/*.parquet`` (the hub's own filesystem), or any other fsspec
protocol.  pyarrow opens the schemes it knows (``s3``, ``gs``, ``hdfs``, ``file``), with credentials and
endpoint from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``...), as checkpoint
storage does; fsspec opens the rest (``hf`` through ``huggingface_hub``).

Listing a source reads no file: each file comes with its size and a version (the modification time, or
the hub's blob id), which together stand for its content (:class:`SourceFile`).  No Ray here.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ift.data import DataError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
PYARROW_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "file")
_GLOB = "*?["
_BLOCK = 1 << 20


@dataclass(frozen=True)
class SourceFile:
    """One file of a source, as listed: where it is, its format, its size and its version."""

    path: str  # as readers open it: a local path as given, or a URI with its scheme
    format: str  # "jsonl" | "parquet"
    size: int
    version: str  # modification time in ns, or the store's own version (the hub's blob id)

    @property
    def identity(self) -> str:
        """What stands for the file's content without reading it."""
        return f"{self.size}:{self.version}"


def scheme(path: str) -> str | None:
    return path.split("://", 1)[0].lower() if "://" in path else None


def open_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path within it)`` of a local path or a URI (pyarrow's schemes, else fsspec's)."""
    kind = scheme(path)
    if kind is None:
        return pafs.LocalFileSystem(), os.path.abspath(path)
    if kind in PYARROW_SCHEMES:
        return pafs.FileSystem.from_uri(path)
    import fsspec  # only for schemes pyarrow has no filesystem of its own for (hf://, memory://)

    try:
        fs = fsspec.filesystem(kind)
    except (ImportError, ValueError) as exc:
        raise DataError(path, None, f"no filesystem for {kind}:// ({exc})", kind="missing") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(path)


def open_input(path: str) -> Any:
    """A seekable binary file (pyarrow ``NativeFile``) of a local path or a URI."""
    fs, inner = open_filesystem(path)
    return fs.open_input_file(inner)


def iter_lines(f: Any, block: int = _BLOCK) -> Iterator[bytes]:
    """The lines of binary file ``f`` from its position, each with its ``\\n`` (the last may lack it);
    pyarrow's files have no line reader of their own."""
    tail = b""
    while chunk := f.read(block):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield line + b"\n"
    if tail:
        yield tail


def _uri(kind: str | None, inner: str) -> str:
    return inner if kind is None else f"{kind}://{inner}"


def _version(fs: pafs.FileSystem, kind: str | None, info: pafs.FileInfo) -> str:
    if isinstance(fs, pafs.PyFileSystem):  # fsspec: its own version fields where the store has them
        detail = fs.handler.fs.info(info.path)
        for key in ("blob_id", "sha256", "ETag", "etag", "version_id", "mtime", "LastModified", "created"):
            if detail.get(key):
                return f"{key}={detail[key]}"
    if info.mtime_ns is not None:
        return str(info.mtime_ns)
    raise DataError(_uri(kind, info.path), None, "the filesystem gives no modification time or version", kind="format")


def list_files(path: str) -> list[SourceFile]:
    """The JSONL/Parquet files of a source path (a file, a directory, or a glob; local or a URI), sorted,
    each with its size and version.  Reads no file."""
    kind = scheme(path)
    if kind is None:  # local paths keep the form they were given in (errors name them so)
        fs: pafs.FileSystem = pafs.LocalFileSystem()
        names = _local_paths(path)
        infos = fs.get_file_info([os.path.abspath(p) for p in names]) if names else []
    else:
        fs, inner = open_filesystem(path)
        infos = _remote_infos(fs, inner)
        names = [_uri(kind, i.path) for i in infos]
    if not infos:
        reason = "no such file, or the glob/directory matched no .jsonl/.parquet file"
        raise DataError(path, None, reason, kind="missing")
    out = []
    for name, info in zip(names, infos, strict=True):
        suffix = Path(name).suffix
        if suffix not in FORMATS:
            raise DataError(name, None, "unsupported file type (expected .jsonl, .json or .parquet)", kind="format")
        out.append(SourceFile(name, FORMATS[suffix], int(info.size), _version(fs, kind, info)))
    return out


def _local_paths(p: str) -> list[str]:
    if any(ch in p for ch in _GLOB):
        return sorted(glob.glob(p, recursive=True))
    if os.path.isdir(p):
        return sorted(str(f) for f in Path(p).rglob("*") if f.suffix in FORMATS and f.is_file())
    return [p] if os.path.exists(p) else []


def _remote_infos(fs: pafs.FileSystem, inner: str) -> list[pafs.FileInfo]:
    if any(ch in inner for ch in _GLOB):
        first = min(inner.index(ch) for ch in _GLOB if ch in inner)
        base = inner[:first].rsplit("/", 1)[0]
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(
            (i for i in found if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, inner)),
            key=lambda i: i.path,
        )
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return [info]
    if info.type == pafs.FileType.Directory:
        found = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        return sorted(
            (i for i in found if i.type == pafs.FileType.File and Path(i.path).suffix in FORMATS),
            key=lambda i: i.path,
        )
    return []
