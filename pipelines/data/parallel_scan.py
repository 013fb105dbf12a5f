"""Scanning new source files in parallel Ray tasks, so the driver reads none of a corpus's bytes.

:class:`pipelines.data.sources.SourceScanner` lists files on the driver (metadata only) and hands
the ones its index does not hold to :func:`scan_in_tasks`: one task per file, spread over the
cluster's nodes, each reading its file once (JSONL: lines and shard offsets; Parquet: the footer).
A handful of small files is scanned in the driver instead: a task costs more than reading them.
"""

from __future__ import annotations

import ray

from pipelines.config import TrainConfig
from pipelines.data.files import SourceFile
from pipelines.data.sources import FileScan, ScanIndex, SourceScanner, index_root, scan_file, scan_files

# New files totalling at most this many bytes are scanned on the driver (a few ms; no task start-up).
INLINE_SCAN_BYTES = 8 << 20


def scan_in_tasks(files: list[SourceFile], content_hash: bool) -> list[FileScan]:
    """:func:`pipelines.data.sources.scan_file` of each file, in parallel Ray tasks (in order)."""
    if sum(f.size for f in files) <= INLINE_SCAN_BYTES:
        return scan_files(files, content_hash)
    task = ray.remote(num_cpus=1, max_retries=3)(scan_file)
    return ray.get([task.remote(f, content_hash=content_hash) for f in files])


def cluster_scanner(cfg: TrainConfig) -> SourceScanner:
    """The scanner a run's driver uses: the index in ``<data.cache_dir>/index``, new files scanned in tasks."""
    return SourceScanner(ScanIndex(index_root(cfg.data.cache_dir)), cfg.data.content_hash, scan_in_tasks)
