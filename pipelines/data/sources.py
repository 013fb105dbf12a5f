"""A corpus as a list of shards: which rows exist, where each shard starts, and which rows a split keeps.

Nothing is tokenized here and nothing needs Ray.  A source's files are listed with their
identity (size and version: :mod:`pipelines.data.files`; local paths, ``s3://``, ``gs://``,
``hf://`` and other URIs), and each file is scanned once: JSONL line counts and shard offsets in
one pass, Parquet footers (:func:`scan_file`).  A scan is kept in a :class:`ScanIndex` under the
file's identity, so a second run, a resubmission or a sweep trial on unchanged files reads no
source byte before training; new files are scanned by whatever ``scan_many`` the
:class:`SourceScanner` is given (in this process, or in parallel Ray tasks on the cluster:
:mod:`pipelines.data.parallel_scan`).  The files are then cut into :class:`Shard` s of about
``SHARD_ROWS`` rows, and Ray Data reads the shards in parallel (:func:`read_shard`).  The scan gives

* the number of rows, so the LR schedule and the progress bar know the step count
  before the first row is tokenized (the rule is in :func:`expected_rows`);
* the fingerprint that keys the tokenized cache and guards resumption: the files' identity, or
  with ``data.content_hash`` a sha256 of their bytes (a full read of each new file);
* byte offsets, so a shard of a multi-GB JSONL file starts reading where it begins.

Row identity is ``(source file, 0-based row in that file)`` everywhere (errors,
DPO's reference table, the determinism tests).  Which rows a split keeps is a pure
function of that identity and the seed, so every reader, on any node, after any
restart, makes the same choice:

* a mixture weight ``w`` reads each shard ``floor(w)`` times, plus once more
  keeping the rows whose hash falls below ``w - floor(w)``;
* ``validation_fraction`` f sends the rows whose hash falls below f to validation
  and the rest to train;
* ``max_rows`` keeps the first rows of a source, files in sorted order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ift.data import DataError
from pipelines.config import DataSource
from pipelines.data.files import SourceFile, iter_lines, list_files, open_filesystem, open_input, scheme

# Rows per read task, a resumable unit of a large file and a cache file.  Small enough that the
# first shard reaches the tokenizer and the first micro-batches the workers as soon on a corpus
# of millions of rows as on one of two thousand (the time to the first step must not grow with
# the corpus); 5M rows make ~2,400 read tasks per epoch, which Ray Data streams without strain.
SHARD_ROWS = 2048
_HASH_CHUNK = 1 << 20
SCAN_VERSION = 2  # bumped when a scan's layout changes: older index entries are then not read


@dataclass(frozen=True)
class FileScan:
    """One file of a source: its format, row count, fingerprint and where its shards start."""

    path: str
    format: str  # "jsonl" | "parquet" | "hf" (a hub dataset)
    rows: int
    # "sha256:<hex>" of the bytes (content_hash), "id:<size>:<version>" of the listing, or the hub's fingerprint
    fingerprint: str
    # JSONL: (first row, byte offset, 1-based line) every SHARD_ROWS rows.  Parquet: (first row, row group, 0).
    starts: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Shard:
    """A row range of one file, read as one Ray Data task.

    ``copy_fraction`` < 1 keeps only the rows whose hash is below it (the
    fractional part of a mixture weight); ``holdout`` (f, side) keeps the rows
    whose hash is below f (side "validation") or not (side "train").
    """

    path: str
    format: str  # "jsonl" | "parquet" | "hf" | "cache" (a prepared shard: tokenized rows)
    first_row: int
    num_rows: int
    offset: int = 0  # JSONL byte offset of first_row, or Parquet's first row group
    first_line: int = 1
    source_index: int = 0
    copy: int = 0
    copy_fraction: float = 1.0
    holdout: tuple[float, str] | None = None
    seed: int = 0
    # Cache shards hold rows of many files: (file name, rows kept) caps each file for max_rows.
    row_limits: tuple[tuple[str, int], ...] = ()

    def to_item(self) -> dict[str, Any]:
        return {"shard": json.dumps(asdict(self))}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Shard:
        d = json.loads(item["shard"])
        if d.get("holdout") is not None:
            d["holdout"] = tuple(d["holdout"])
        d["row_limits"] = tuple(tuple(x) for x in d.get("row_limits", ()))
        return cls(**d)


# --------------------------------------------------------------------------- scanning


def expand_paths(src: DataSource) -> list[str]:
    """Files of a source (a path, a directory of JSONL/Parquet, or a glob; local or a URI), sorted."""
    return [f.path for f in list_files(src.path)]


def scan_file(file: SourceFile | str, *, content_hash: bool = False) -> FileScan:
    """Count rows and index shard starts, in one pass over a JSONL file (a Parquet file: its footer;
    with ``content_hash`` also every byte, hashed)."""
    if isinstance(file, str):
        (file,) = list_files(file)
    h = hashlib.sha256() if content_hash else None
    with open_input(file.path) as fh:
        if file.format == "parquet":
            if h is not None:
                for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
                    h.update(chunk)
            meta = pq.ParquetFile(fh).metadata
            starts, row, pending = [], 0, 0
            for g in range(meta.num_row_groups):
                if not starts or pending >= SHARD_ROWS:
                    starts.append((row, g, 0))
                    pending = 0
                n = meta.row_group(g).num_rows
                row += n
                pending += n
            return FileScan(file.path, file.format, row, _fingerprint(file, h), tuple(starts))
        rows, offset, starts = 0, 0, []
        for lineno, line in enumerate(iter_lines(fh), start=1):
            if h is not None:
                h.update(line)
            if line.strip():
                if rows % SHARD_ROWS == 0:
                    starts.append((rows, offset, lineno))
                rows += 1
            offset += len(line)
    return FileScan(file.path, file.format, rows, _fingerprint(file, h), tuple(starts))


def _fingerprint(file: SourceFile, h: Any) -> str:
    return f"sha256:{h.hexdigest()}" if h is not None else f"id:{file.identity}"


def scan_files(files: list[SourceFile], content_hash: bool) -> list[FileScan]:
    """:func:`scan_file` of each file, one after the other in this process."""
    return [scan_file(f, content_hash=content_hash) for f in files]


ScanMany = Callable[[list[SourceFile], bool], list[FileScan]]


class ScanIndex:
    """The scans of source files, kept under ``root`` (a local directory or a URI) by each file's
    location and identity: one small JSON file per scanned file.  A changed file (another size or
    version) has another key, so a stale scan is never read; ``writable=False`` (the dry run) reads
    and writes nothing new."""

    def __init__(self, root: str, *, writable: bool = True):
        self.root, self.writable = root.rstrip("/"), writable

    def _key(self, file: SourceFile, content_hash: bool) -> str:
        where = file.path if scheme(file.path) else os.path.abspath(file.path)
        text = f"{SCAN_VERSION}|{SHARD_ROWS}|{where}|{file.identity}|{content_hash}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, file: SourceFile, content_hash: bool) -> FileScan | None:
        fs, root = open_filesystem(self.root)
        path = f"{root}/{self._key(file, content_hash)}.json"
        try:
            with fs.open_input_stream(path) as f:
                d = json.loads(f.read())
            # The path as this run names the file (an index entry may come from another working directory).
            return FileScan(file.path, d["format"], d["rows"], d["fingerprint"], tuple(tuple(x) for x in d["starts"]))
        except (OSError, ValueError, KeyError, TypeError):  # not indexed yet, or an unreadable entry: scan again
            return None

    def put(self, file: SourceFile, content_hash: bool, scan: FileScan) -> None:
        if not self.writable:
            return
        fs, root = open_filesystem(self.root)
        fs.create_dir(root, recursive=True)
        path = f"{root}/{self._key(file, content_hash)}.json"
        body = json.dumps({**asdict(scan), "identity": file.identity}).encode()
        # Atomic: a rename locally; one PUT on object storage.
        target = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if isinstance(fs, pafs.LocalFileSystem) else path
        with fs.open_output_stream(target) as f:
            f.write(body)
        if target != path:
            fs.move(target, path)


@dataclass
class SourceScanner:
    """Each source's file scans, from the index where a file is unchanged, else scanned by ``scan_many``
    (and indexed); each source once per scanner.  ``scanned_files`` / ``scanned_bytes``: what was read."""

    index: ScanIndex | None = None
    content_hash: bool = False
    scan_many: ScanMany = scan_files
    scanned_files: int = 0
    scanned_bytes: int = 0
    _memo: dict[tuple[str, str], list[FileScan]] = field(default_factory=dict, repr=False)

    def scans(self, src: DataSource) -> list[FileScan]:
        key = (src.path, src.split)
        if key not in self._memo:
            self._memo[key] = [scan_hub(src)] if src.path.startswith("hf:") else self._scan_files(list_files(src.path))
        return self._memo[key]

    def _scan_files(self, files: list[SourceFile]) -> list[FileScan]:
        found = {f.path: self.index.get(f, self.content_hash) for f in files} if self.index else {}
        missing = [f for f in files if found.get(f.path) is None]
        if missing:
            for f, scan in zip(missing, self.scan_many(missing, self.content_hash), strict=True):
                found[f.path] = scan
                if self.index is not None:
                    self.index.put(f, self.content_hash, scan)
            self.scanned_files += len(missing)
            self.scanned_bytes += sum(f.size for f in missing)
        return [found[f.path] for f in files]


def index_root(cache_dir: str) -> str:
    """Where a config's scan index lives: ``<data.cache_dir>/index``."""
    return f"{cache_dir.rstrip('/')}/index"


def load_hub_dataset(path: str):
    """``hf:<id>:<split>`` -> the Hugging Face dataset (memory-mapped from the local hub cache)."""
    import datasets  # Hugging Face datasets loads only for hf: sources

    name, split = path[len("hf:") :].rsplit(":", 1)
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown id, unknown split: the hub's message says which
        raise DataError(
            path, None, f"cannot load hub dataset '{name}' split '{split}': {exc}", kind="missing"
        ) from None


def scan_hub(src: DataSource) -> FileScan:
    """A hub dataset as one "file": its rows, and the dataset's own fingerprint as the content hash."""
    path = f"{src.path}:{src.split}"
    ds = load_hub_dataset(path)
    fp = getattr(ds, "_fingerprint", None) or f"{len(ds)}"
    starts = tuple((r, r, 0) for r in range(0, len(ds), SHARD_ROWS))
    return FileScan(path, "hf", len(ds), "hf:" + hashlib.sha256(f"{path}:{fp}".encode()).hexdigest(), starts)


def scan_source(src: DataSource) -> list[FileScan]:
    """Every file of a source, scanned here and now (a hub dataset is one): no index."""
    return SourceScanner().scans(src)


def source_fingerprint(src: DataSource, scans: list[FileScan]) -> str:
    """A source's files (names and fingerprints) in 16 hex characters."""
    h = hashlib.sha256()
    for s in scans:
        h.update(f"{os.path.basename(s.path)}:{s.fingerprint}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- shards


def file_shards(scan: FileScan, *, max_rows: int | None = None, **fields: Any) -> list[Shard]:
    """``scan`` cut at its shard starts (the first ``max_rows`` rows only, if given)."""
    limit = scan.rows if max_rows is None else min(scan.rows, max_rows)
    out = []
    for i, (first, offset, line) in enumerate(scan.starts):
        if first >= limit:
            break
        end = scan.starts[i + 1][0] if i + 1 < len(scan.starts) else scan.rows
        out.append(
            Shard(scan.path, scan.format, first, min(end, limit) - first, offset=offset, first_line=line, **fields)
        )
    return out


def source_shards(
    src: DataSource, scans: list[FileScan], *, source_index: int, seed: int, holdout: tuple[float, str] | None = None
) -> list[Shard]:
    """The shards of one source, repeated and sampled for its mixture weight."""
    whole, frac = divmod(src.weight, 1.0)
    copies = [(c, 1.0) for c in range(int(whole))] + ([(int(whole), frac)] if frac > 1e-9 else [])
    out: list[Shard] = []
    for copy, fraction in copies:
        left = src.max_rows
        for scan in scans:
            if left is not None and left <= 0:
                break
            out += file_shards(
                scan, max_rows=left, source_index=source_index, copy=copy, copy_fraction=fraction,
                holdout=holdout, seed=seed,
            )  # fmt: skip
            if left is not None:
                left -= scan.rows
    return out


def shuffled(shards: list[Shard], seed: int) -> list[Shard]:
    """The shards in a seeded order: a file-level shuffle that mixes sources and copies."""
    out = list(shards)
    random.Random(seed).shuffle(out)
    return out


def expected_rows(shards: list[Shard]) -> int:
    """Rows the shards will yield, before bad rows are dropped.

    Exact for whole copies; a fractional copy or a hold-out counts its expected
    share (rounded down).  The step count of an epoch is computed from this; an
    epoch whose stream ends earlier (bad rows, sampling) simply ends there, on every
    rank at the same step.
    """
    total = 0.0
    for s in shards:
        share = s.copy_fraction
        if s.holdout is not None:
            f, side = s.holdout
            share *= f if side == "validation" else 1.0 - f
        total += s.num_rows * share
    return int(math.floor(total + 1e-9))


# --------------------------------------------------------------------------- reading


def row_hash(seed: int, tag: str, path: str, row: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, tag, file name, row)."""
    digest = hashlib.blake2b(f"{seed}:{tag}:{os.path.basename(path)}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def row_limits(scans: list[FileScan], max_rows: int | None) -> tuple[tuple[str, int], ...]:
    """``max_rows`` of a source as a cap per file (files in sorted order); () without a cap."""
    if max_rows is None:
        return ()
    out, left = [], max_rows
    for scan in scans:
        out.append((os.path.basename(scan.path), max(0, min(scan.rows, left))))
        left -= scan.rows
    return tuple(out)


def keeps(shard: Shard, row: int, source: str | None = None) -> bool:
    """Whether ``shard`` keeps row ``row`` of file ``source`` (default: the shard's own file; a
    cache shard holds rows of many files): the rule of the module docstring, the same on every reader."""
    name = source or shard.path
    if shard.row_limits and row >= dict(shard.row_limits).get(os.path.basename(name), 0):
        return False
    if shard.copy_fraction < 1.0:
        if row_hash(shard.seed, f"weight{shard.source_index}", name, row) >= shard.copy_fraction:
            return False
    if shard.holdout is not None:
        fraction, side = shard.holdout
        return (row_hash(shard.seed, "holdout", name, row) < fraction) == (side == "validation")
    return True


def read_shard(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One shard -> its kept rows as ``{source, row, line, payload}`` (payload: the row's JSON text;
    ``line`` is the JSONL line, 0 for Parquet).  Parsing happens at tokenization, so a malformed
    line is a bad row like any other, named by file and line."""
    shard = Shard.from_item(item)
    return _SHARD_READERS[shard.format](shard)


def _read_jsonl_shard(shard: Shard) -> Iterator[dict[str, Any]]:
    row, end = shard.first_row, shard.first_row + shard.num_rows
    with open_input(shard.path) as fh:
        fh.seek(shard.offset)
        for lineno, line in enumerate(iter_lines(fh), start=shard.first_line):
            if row >= end:
                break
            if not line.strip():
                continue
            if keeps(shard, row):
                yield {"source": shard.path, "row": row, "line": lineno, "payload": line.decode("utf-8", "replace")}
            row += 1


def _read_hub_shard(shard: Shard) -> Iterator[dict[str, Any]]:
    ds = load_hub_dataset(shard.path)
    for row in range(shard.first_row, shard.first_row + shard.num_rows):
        if keeps(shard, row):
            yield {"source": shard.path, "row": row, "line": 0, "payload": json.dumps(ds[row], default=str)}


def _read_parquet_shard(shard: Shard) -> Iterator[dict[str, Any]]:
    pf = pq.ParquetFile(open_input(shard.path))
    row, end, group = shard.first_row, shard.first_row + shard.num_rows, shard.offset
    while row < end and group < pf.metadata.num_row_groups:
        for record in pf.read_row_group(group).to_pylist():
            if row >= end:
                break
            if keeps(shard, row):
                yield {"source": shard.path, "row": row, "line": 0, "payload": json.dumps(record, default=str)}
            row += 1
        group += 1


_SHARD_READERS = {"jsonl": _read_jsonl_shard, "hf": _read_hub_shard, "parquet": _read_parquet_shard}
