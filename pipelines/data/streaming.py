"""Ray Data: the corpus as a stream of tokenized rows, split across the Ray Train workers.

Per epoch, for each split::

    shards (pipelines.data.sources, seeded order) -> read_shard (one task per shard)
        -> TokenizeRows (map_batches, an actor pool: the tokenizer loads once per actor)
        -> streaming_split across the workers (Ray Train's DataConfig, equal rows per rank)

or, with ``data.cache=true``, the prepared Parquet shards of ``pipelines.data.cache``
(already tokenized) instead of the first two stages.  Nothing is materialized:
the first optimizer step waits for the first micro-batch, not for the corpus;
each rank reads only its own rows; and everything a retried worker needs is
re-read from the source files or the cache (no block lives only in one node's
object store).  With ``preserve_order`` the stream, the split and the per-epoch
local shuffle (seeded from ``seed``, the epoch and the rank:
:func:`pipelines.training.recipe.shuffle_seed`) are the same in every run with the same seed.

Bad rows are not dropped here: they flow with an ``error`` column to the worker
that owns them, which stops the run naming the file and line
(``on_bad_row=error``) or skips and counts them (``skip``); see
:mod:`pipelines.data.batching`.  ``ift data check`` reports every bad row of a corpus.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from ift.data import DataError
from pipelines.config import DataSource, TrainConfig
from pipelines.data.batching import data_mode, estimate_examples_per_pack, packing_of, token_keys
from pipelines.data.cache import cached_plan, read_cached_shard
from pipelines.data.parallel_scan import cluster_scanner
from pipelines.data.plan import DataPlan, SplitPlan, examples_fingerprint, local_scanner
from pipelines.data.sources import (
    SourceScanner,
    expected_rows,
    read_shard,
    shuffled,
    source_fingerprint,
    source_shards,
)
from pipelines.data.tokenize import TokenizeRows, tokenize, tokenize_rows_args, tokenizer_resources

# --------------------------------------------------------------------------- plans


def _source_key(src: DataSource) -> str:
    return f"{src.weight}:{src.max_rows}"


def plan_data(cfg: TrainConfig, scanner: SourceScanner | None = None) -> DataPlan:
    """Scan the sources (row counts and fingerprints, from the scan index where the files are
    unchanged) and lay out each split's shards.  ``scanner``: how new files are scanned (default:
    in this process, :func:`pipelines.data.plan.local_scanner`).

    With ``data.cache=true`` the shards are the prepared cache's (prepared first
    if missing, see :func:`pipelines.data.cache.prepare`).
    """
    seed = cfg.optimization.seed
    scanner = scanner or local_scanner(cfg)
    if cfg.data.cache:
        return cached_plan(cfg, scanner)
    holdout = cfg.data.validation_fraction if not cfg.data.validation else 0.0

    def split(sources: list[DataSource], side: str | None) -> SplitPlan:
        shards, fps = [], []
        for i, src in enumerate(sources):
            scans = scanner.scans(src)
            fps.append(f"{source_fingerprint(src, scans)}:{_source_key(src)}")
            if side == "validation":  # held-out rows: each source once, whatever its weight
                src = src.model_copy(update={"weight": 1.0})
            shards += source_shards(
                src, scans, source_index=i, seed=seed, holdout=(holdout, side) if side and holdout else None
            )
        shards = shuffled(shards, seed)
        return SplitPlan(shards, expected_rows(shards), examples_fingerprint(fps, cfg, f"{side}:{holdout}"))

    train = split(cfg.data.train, "train" if holdout else None)
    if cfg.data.validation:
        validation = split(cfg.data.validation, None)
    elif holdout:
        validation = split(cfg.data.train, "validation")
    else:
        validation = None
    return DataPlan(train=train, validation=validation)


def stream(plan: SplitPlan, cfg: TrainConfig, *, from_cache: bool, concurrency: int, num_cpus: float):
    """A split's lazy Ray Dataset of tokenized rows (``META_KEYS`` + the mode's token columns)."""
    items = [s.to_item() for s in plan.shards]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # Reading a shard is I/O (parsing and tokenizing happen in the actors): it reserves no CPU, so it
    # runs even when the training workers and the tokenizer hold every CPU of a small machine.
    # ... and at most `readers` at a time: a task that reserves no CPU is otherwise started for every
    # shard at once, and on a small machine the worker processes Ray spawns for hundreds of them
    # starve the tokenizer and the training workers for tens of seconds before the first step.
    readers = max(2, concurrency)
    if from_cache:
        return ds.map_batches(read_cached_shard, batch_size=1, batch_format="numpy", num_cpus=0, concurrency=readers)
    rows = ds.flat_map(read_shard, num_cpus=0, concurrency=readers)
    return tokenize(rows, cfg, concurrency=concurrency, num_cpus=num_cpus)


# --------------------------------------------------------------------------- packing estimate

PACKING_SAMPLE_ROWS = 2048


def sample_examples(plan: SplitPlan, cfg: TrainConfig, *, from_cache: bool, rows: int) -> list[dict[str, list[int]]]:
    """Up to ``rows`` good tokenized examples of a split, read on the driver from its first shards in
    plan order (which is seeded-shuffled, so a mixture's sources all appear): what packing is estimated on."""
    keys = token_keys(data_mode(cfg))
    tokenize_rows = None
    out: list[dict[str, list[int]]] = []
    for shard in plan.shards:
        if from_cache:
            batch = read_cached_shard({"shard": [shard.to_item()["shard"]]}).to_pydict()
        else:
            raw = list(itertools.islice(read_shard(shard.to_item()), rows - len(out)))
            if not raw:
                continue
            if tokenize_rows is None:
                tokenize_rows = TokenizeRows(*tokenize_rows_args(cfg))
            batch = tokenize_rows({k: np.asarray([r[k] for r in raw], dtype=object) for k in raw[0]})
        for i, error in enumerate(batch["error"]):
            if not error:
                out.append({k: list(batch[k][i]) for k in keys})
        if len(out) >= rows:
            break
    return out[:rows]


def estimate_rows_per_micro(cfg: TrainConfig, plan: SplitPlan, *, from_cache: bool) -> float:
    """Examples one micro-batch holds: ``micro_batch_size`` padded; packed, ``micro_batch_size`` rows
    times the mean examples per row of a packed sample of the corpus
    (:func:`pipelines.data.batching.estimate_examples_per_pack`)."""
    if not cfg.data.packing:
        return float(cfg.optimization.micro_batch_size)
    rows = max(PACKING_SAMPLE_ROWS, 2 * cfg.data.packing_window)
    sample = sample_examples(plan, cfg, from_cache=from_cache, rows=rows)
    if not sample:
        raise DataError(plan.shards[0].path if plan.shards else "train", 0, "no good row to estimate packing from")
    return cfg.optimization.micro_batch_size * estimate_examples_per_pack(sample, packing_of(cfg))


@dataclass
class StreamingData:
    """What the trainer needs from the data stage."""

    train: ray.data.Dataset
    validation: ray.data.Dataset | None
    train_rows: int  # rows the train stream holds before bad rows (exact from a cache)
    validation_rows: int
    rows_per_micro: float  # examples per micro-batch: micro_batch_size, or estimated from packing
    fingerprints: dict[str, str]
    from_cache: bool
    tokenizer_actors: int
    tokenizer_cpus: float
    cache_paths: list[str] = field(default_factory=list)


def build_datasets(cfg: TrainConfig, *, cluster_cpus: float | None = None) -> StreamingData:
    """Plan the splits and build their lazy streams (nothing is read or tokenized yet; new source files
    are scanned in Ray tasks, unchanged ones come from the scan index)."""
    plan = plan_data(cfg, cluster_scanner(cfg))
    if cluster_cpus is None:
        cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
    actors, cpus = tokenizer_resources(cfg, cluster_cpus)
    kwargs: dict[str, Any] = {"from_cache": plan.from_cache, "concurrency": actors, "num_cpus": cpus}
    fps = {"train": plan.train.fingerprint}
    validation = None
    if plan.validation is not None:
        validation = stream(plan.validation, cfg, **kwargs)
        fps["validation"] = plan.validation.fingerprint
    return StreamingData(
        train=stream(plan.train, cfg, **kwargs),
        validation=validation,
        train_rows=plan.train.rows,
        validation_rows=plan.validation.rows if plan.validation is not None else 0,
        rows_per_micro=estimate_rows_per_micro(cfg, plan.train, from_cache=plan.from_cache),
        fingerprints=fps,
        from_cache=plan.from_cache,
        tokenizer_actors=actors,
        tokenizer_cpus=cpus,
        cache_paths=plan.cache_paths,
    )
