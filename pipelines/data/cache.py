"""The tokenized cache: each source tokenized once, as Parquet shards, reused by every run and sweep trial.

``ift data prepare`` reads every row of every source of a config, tokenizes it
(the same :class:`pipelines.data.tokenize.TokenizeRows` as streaming) and writes
``<cache_dir>/<key>/part-*.parquet`` plus ``manifest.json``, written last: a
directory without a manifest is an unfinished write and is redone.  The key
hashes what decides the tokens: the source files' fingerprints (identity, or content with
``data.content_hash``), the tokenizer (name
and revision), ``max_length``, ``truncation``, the data mode (SFT rows or
preference pairs) and :data:`pipelines.data.streaming.TOKENIZATION_VERSION`.  A second
``prepare`` with unchanged inputs tokenizes nothing and says so; any change gives
a new key.  ``cache_dir`` may be a local path or any pyarrow filesystem URI
(``s3://bucket/prefix`` on a cluster, so every node reads the same cache).

Bad rows stay in the shards with their ``error`` (so a later ``skip`` run counts
them exactly as streaming would); ``on_bad_row=error`` refuses to finish a cache
of a corpus that has any.  Mixture weights, ``max_rows`` and validation
hold-outs apply at read time, on the cached rows' (file, row) identity, so one
cache serves every mixture of its sources.

``ift data check`` (:mod:`pipelines.data.check`) validates a whole corpus without a cache, without
Ray and without training: counts, the first bad rows by file and line, truncated rows.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from ift.data import BadRowReport, DataError
from pipelines.config import DataSource, TrainConfig
from pipelines.data.batching import data_mode
from pipelines.data.files import open_filesystem
from pipelines.data.parallel_scan import cluster_scanner
from pipelines.data.plan import DataPlan, SplitPlan, examples_fingerprint
from pipelines.data.sources import (
    SHARD_ROWS,
    FileScan,
    Shard,
    SourceScanner,
    expected_rows,
    file_shards,
    keeps,
    read_shard,
    row_limits,
    shuffled,
    source_fingerprint,
)
from pipelines.data.tokenize import TOKENIZATION_VERSION, tokenize, tokenizer_id, tokenizer_resources

MANIFEST = "manifest.json"


def _join_uri(base: str, path: str) -> str:
    """``path`` (a filesystem path) as a string every reader can open: the URI's scheme kept."""
    return f"{base.split('://', 1)[0]}://{path}" if "://" in base else path


@dataclass
class CacheEntry:
    """One source's cache: where it is and what its manifest says (``None`` until prepared)."""

    source: DataSource
    key: str
    directory: str  # as readers open it: a local path, or a URI with its scheme
    scans: list[FileScan]
    manifest: dict[str, Any] | None = None
    tokenized_now: bool = False


def cache_key(src: DataSource, scans: list[FileScan], cfg: TrainConfig) -> str:

    h = hashlib.sha256(source_fingerprint(src, scans).encode())
    h.update(
        f"{tokenizer_id(cfg)}:{cfg.data.max_length}:{cfg.data.truncation}:{data_mode(cfg)}:{TOKENIZATION_VERSION}".encode()
    )
    return h.hexdigest()[:16]


def _read_manifest(fs: pafs.FileSystem, directory: str) -> dict[str, Any] | None:
    path = f"{directory}/{MANIFEST}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def entries(cfg: TrainConfig, scanner: SourceScanner | None = None) -> list[CacheEntry]:
    """The cache entry of every distinct source of the config (train, then validation)."""
    fs, root = open_filesystem(cfg.data.cache_dir)
    scanner = scanner or cluster_scanner(cfg)
    out: dict[str, CacheEntry] = {}
    for src in [*cfg.data.train, *cfg.data.validation]:
        plain = _plain(src)
        scans = scanner.scans(plain)
        key = cache_key(plain, scans, cfg)
        if key not in out:
            directory = f"{root}/{key}"
            out[key] = CacheEntry(plain, key, _join_uri(cfg.data.cache_dir, directory), scans,
                                  _read_manifest(fs, directory))  # fmt: skip
    return list(out.values())


def _plain(src: DataSource) -> DataSource:
    """The source as the cache holds it: every row once (weights and caps apply at read time)."""
    return src.model_copy(update={"weight": 1.0, "max_rows": None})


# --------------------------------------------------------------------------- writing


def _length_stats(lengths: np.ndarray) -> dict[str, int]:
    if lengths.size == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(lengths.max())}


def _part_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(directory))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _summarize(fs: pafs.FileSystem, directory: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-shard rows and the corpus figures, from the written shards' small columns."""
    shards, lengths, bad = [], [], []
    for path in _part_files(fs, directory):
        with fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["source", "row", "line", "error", "error_kind", "num_tokens"])
        errors = t.column("error").to_numpy(zero_copy_only=False)
        good = errors == ""
        tokens = t.column("num_tokens").to_numpy()
        lengths.append(tokens[good])
        shards.append({"file": path.rsplit("/", 1)[-1], "rows": t.num_rows, "good_rows": int(good.sum())})
        for i in np.flatnonzero(~good):
            bad.append({k: t.column(k)[int(i)].as_py() for k in ("source", "row", "line", "error", "error_kind")})
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    bad.sort(key=lambda b: (b["source"], b["row"]))
    report = BadRowReport(seen=sum(s["rows"] for s in shards))
    for b in bad:
        report.add(_as_error(b))
    summary = {
        "rows": report.seen, "good_rows": int(all_lengths.size), "tokens": int(all_lengths.sum()),
        "lengths": _length_stats(all_lengths), "bad_rows": report.to_dict(), "shards": shards,
    }  # fmt: skip
    return summary, bad


def _as_error(b: dict[str, Any]) -> DataError:
    return DataError(b["source"], b["row"], b["error"], kind=b["error_kind"], line=b["line"] or None)


def _tokenized_stream(entry: CacheEntry, cfg: TrainConfig, *, concurrency: int, num_cpus: float):

    shards = [s for scan in entry.scans for s in file_shards(scan)]
    items = [s.to_item() for s in shards]
    rows = ray.data.from_items(items, override_num_blocks=max(1, len(items))).flat_map(read_shard, num_cpus=0)
    return tokenize(rows, cfg, concurrency=concurrency, num_cpus=num_cpus)


def prepare(cfg: TrainConfig, *, log=print, scanner: SourceScanner | None = None) -> list[CacheEntry]:
    """Tokenize every source of ``cfg`` that has no finished cache entry; returns all entries.

    Runs on the cluster's CPUs (no training workers hold any); under
    ``on_bad_row=error`` a source with a bad row is not cached and the first bad row
    is raised (``ift data check`` lists them).
    """

    result = entries(cfg, scanner)
    actors, cpus = tokenizer_resources(cfg, ray.cluster_resources().get("CPU", 1.0), training_cpus=0.0)
    for entry in result:
        if entry.manifest is not None:
            log(f"cached     {entry.source.path}: unchanged inputs, nothing tokenized ({entry.directory})")
            continue
        fs, directory = open_filesystem(entry.directory)
        fs.create_dir(directory, recursive=True)
        fs.delete_dir_contents(directory, missing_dir_ok=True)  # an unfinished earlier write
        started = time.perf_counter()
        _tokenized_stream(entry, cfg, concurrency=actors, num_cpus=cpus).write_parquet(
            directory, filesystem=fs, max_rows_per_file=SHARD_ROWS
        )
        summary, bad = _summarize(fs, directory)
        if bad and cfg.data.on_bad_row == "error":
            first = _as_error(bad[0])
            more = f" ({len(bad) - 1} more bad rows: `ift data check` lists them)" if len(bad) > 1 else ""
            raise DataError(first.source, first.row, first.reason + more, kind=first.kind, line=first.line)
        entry.manifest = {
            "key": entry.key, "source": entry.source.path,
            "files": [{"path": s.path, "rows": s.rows, "fingerprint": s.fingerprint} for s in entry.scans],
            "tokenizer": tokenizer_id(cfg), "max_length": cfg.data.max_length, "truncation": cfg.data.truncation,
            "mode": data_mode(cfg), "seconds": round(time.perf_counter() - started, 2),
            "build_id": uuid.uuid4().hex, **summary,
        }  # fmt: skip
        with fs.open_output_stream(f"{directory}/{MANIFEST}") as f:  # last: it marks the entry finished
            f.write(json.dumps(entry.manifest, indent=1).encode())
        entry.tokenized_now = True
        log(f"tokenized  {entry.source.path} in {entry.manifest['seconds']:.1f} s ({entry.directory})")
    return result


def describe(entry: CacheEntry) -> str:
    m = entry.manifest or {}
    lengths = m.get("lengths", {})
    bad = m.get("bad_rows", {})
    return (
        f"{entry.source.path}\n"
        f"  cache      {entry.directory}{'' if entry.tokenized_now else ' (reused)'}\n"
        f"  rows       {m.get('good_rows', 0):,} good of {m.get('rows', 0):,}; bad rows {bad.get('skipped', 0)} "
        f"{bad.get('by_reason', {}) or ''}\n"
        f"  tokens     {m.get('tokens', 0):,}; length p50 {lengths.get('p50')} p90 {lengths.get('p90')} "
        f"p99 {lengths.get('p99')} max {lengths.get('max')}"
    )


# --------------------------------------------------------------------------- reading


def cached_plan(cfg: TrainConfig, scanner: SourceScanner | None = None):
    """The :class:`pipelines.data.plan.DataPlan` of a config read from its cache (prepared first if missing)."""
    scanner = scanner or cluster_scanner(cfg)
    by_key = {e.key: e for e in prepare(cfg, scanner=scanner)}
    seed = cfg.optimization.seed
    holdout = cfg.data.validation_fraction if not cfg.data.validation else 0.0

    def split(sources: list[DataSource], side: str | None) -> tuple[SplitPlan, list[str]]:
        shards, fps, directories = [], [], []
        for i, src in enumerate(sources):
            scans = scanner.scans(_plain(src))
            entry = by_key[cache_key(_plain(src), scans, cfg)]
            fps.append(f"{source_fingerprint(src, scans)}:{src.weight}:{src.max_rows}")
            directories.append(entry.directory)
            weight = 1.0 if side == "validation" else src.weight  # held-out rows: each source once
            whole, frac = divmod(weight, 1.0)
            copies = [(c, 1.0) for c in range(int(whole))] + ([(int(whole), frac)] if frac > 1e-9 else [])
            for copy, fraction in copies:
                for part in entry.manifest["shards"]:
                    shards.append(
                        Shard(
                            f"{entry.directory}/{part['file']}",
                            "cache",
                            0,
                            part["good_rows"],
                            source_index=i,
                            copy=copy,
                            copy_fraction=fraction,
                            holdout=(holdout, side) if side and holdout else None,
                            seed=seed,
                            row_limits=row_limits(scans, src.max_rows),
                        )
                    )
        shards = shuffled(shards, seed)
        plan = SplitPlan(shards, expected_rows(shards), examples_fingerprint(fps, cfg, f"{side}:{holdout}"))
        return plan, directories

    train, paths = split(cfg.data.train, "train" if holdout else None)
    validation = None
    if cfg.data.validation:
        validation, more = split(cfg.data.validation, None)
        paths += more
    elif holdout:
        validation, _ = split(cfg.data.train, "validation")
    return DataPlan(train=train, validation=validation, from_cache=True, cache_paths=sorted(set(paths)))


def read_cached_shard(item: dict[str, Any]) -> pa.Table:
    """``map_batches`` over one shard item (``batch_size=1``): the shard's kept rows, already tokenized.

    Bad rows stay in (with their ``error``) so the worker applies ``on_bad_row`` exactly
    as it would to a stream.
    """
    shard = Shard.from_item({"shard": item["shard"][0]})
    fs, path = open_filesystem(shard.path)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    sources = table.column("source").to_pylist()
    rows = table.column("row").to_pylist()
    mask = [keeps(shard, r, s) for s, r in zip(sources, rows, strict=True)]
    return table.filter(pa.array(mask, type=pa.bool_()))
