"""What a split reads: its shards in order, its rows and its fingerprint (from the sources or the cache)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from pipelines.config import TrainConfig
from pipelines.data.batching import data_mode
from pipelines.data.sources import ScanIndex, Shard, SourceScanner, index_root
from pipelines.data.tokenize import TOKENIZATION_VERSION, tokenizer_id


@dataclass
class SplitPlan:
    """What one split reads: its shards in order, the rows they hold, and the content fingerprint."""

    shards: list[Shard]
    rows: int
    fingerprint: str


@dataclass
class DataPlan:
    train: SplitPlan
    validation: SplitPlan | None
    from_cache: bool = False
    cache_paths: list[str] = field(default_factory=list)


def examples_fingerprint(source_fps: list[str], cfg: TrainConfig, extra: str = "") -> str:
    """A split's identity: its sources' content, how they are mixed, and how rows become examples."""
    h = hashlib.sha256()
    for fp in source_fps:
        h.update(fp.encode())
    h.update(
        f"{tokenizer_id(cfg)}:{cfg.data.max_length}:{cfg.data.truncation}:{data_mode(cfg)}:"
        f"{TOKENIZATION_VERSION}:{cfg.optimization.seed}:{extra}".encode()
    )
    return h.hexdigest()[:16]


def local_scanner(cfg: TrainConfig, *, writable: bool = True) -> SourceScanner:
    """A scanner that scans new files in this process, with the config's index (``<data.cache_dir>/index``);
    ``writable=False`` reads the index and adds nothing to it (the dry run writes nothing)."""
    return SourceScanner(ScanIndex(index_root(cfg.data.cache_dir), writable=writable), cfg.data.content_hash)
