"""Ray Data: read sources, mix them, validate + tokenize in parallel, report bad rows.

Local JSONL and Parquet files are read by one Ray task per file that numbers its
rows, so every error names the file and the row (``ray.data.read_json`` fails on
a malformed line with a pyarrow message that names neither).  Hub datasets go
through ``ray.data.from_huggingface``.  Tokenization runs in ``map_batches``
with a callable class, so each actor loads the tokenizer once.  Rows that fail
validation keep flowing with an ``error`` column, so the driver can either stop
at the first one (``on_bad_row=error``) or count them all (``skip``); nothing is
dropped silently.

The tokenized datasets are materialized before training: on a 2-core machine
tokenization must not compete with the training workers for CPUs, and every
worker reads the same blocks in the same order (see ``pipelines.worker``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from ift.data import BadRowReport, DataError, tokenize_example
from ift.models import load_tokenizer
from pipelines.config import DataSource, TrainConfig

_META = ("source", "row")


@dataclass
class PreparedData:
    """What the trainer needs from the data stage."""

    train: ray.data.Dataset
    validation: ray.data.Dataset | None
    train_rows: int
    validation_rows: int
    report: BadRowReport
    fingerprints: dict[str, str] = field(default_factory=dict)
    train_tokens: int = 0


# --------------------------------------------------------------------------- reading


def expand_paths(src: DataSource) -> list[str]:
    """Files of a local source (a path, a directory of JSONL/Parquet, or a glob)."""
    p = src.path
    if any(ch in p for ch in "*?["):
        files = sorted(glob.glob(p, recursive=True))
    elif os.path.isdir(p):
        files = sorted(
            str(f) for f in Path(p).rglob("*") if f.suffix in (".jsonl", ".json", ".parquet") and f.is_file()
        )
    else:
        files = [p] if os.path.exists(p) else []
    if not files:
        raise DataError(p, None, "no such file, or the glob/directory matched no .jsonl/.parquet file", kind="missing")
    for f in files:
        if Path(f).suffix not in (".jsonl", ".json", ".parquet"):
            raise DataError(f, None, "unsupported file type (expected .jsonl, .json or .parquet)", kind="format")
    return files


def _read_file_rows(item: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One file -> rows tagged with (source, row); runs as a Ray task per file."""
    path = item["path"]
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield {"source": path, "row": index, "payload": json.dumps(record, default=str)}
                index += 1
        return
    index = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            # Parsing happens in the tokenizer stage so a malformed line is a counted bad row.
            yield {"source": path, "row": index, "payload": line, "line": lineno}
            index += 1


def _hf_rows(src: DataSource) -> ray.data.Dataset:
    import datasets

    name = src.path[len("hf:") :]
    try:
        hf = datasets.load_dataset(name, split=src.split)
    except Exception as exc:  # offline, unknown id, unknown split
        raise DataError(
            src.path, None, f"cannot load hub dataset '{name}' split '{src.split}': {exc}", kind="missing"
        ) from None
    hf = hf.map(
        lambda ex, i: {"payload": json.dumps(ex, default=str), "source": src.path, "row": i},
        with_indices=True,
        remove_columns=hf.column_names,
    )
    return ray.data.from_huggingface(hf)


def read_source(src: DataSource) -> ray.data.Dataset:
    """A source as a Ray Dataset of ``{source, row, payload}`` rows (payload: JSON text)."""
    if src.path.startswith("hf:"):
        ds = _hf_rows(src)
    else:
        files = expand_paths(src)
        ds = ray.data.from_items([{"path": f} for f in files]).flat_map(_read_file_rows)
        ds = ds.select_columns(["source", "row", "payload"])
    if src.max_rows is not None:
        ds = ds.limit(src.max_rows)
    return ds


def mix_sources(sources: list[DataSource], seed: int) -> ray.data.Dataset:
    """Union of sources, each resampled by its ``weight``.

    A weight is a sampling factor on the source's rows: 2.0 uses every row twice,
    0.5 a seeded random half, 1.5 every row once plus a random half.
    """
    parts = []
    for i, src in enumerate(sources):
        ds = read_source(src)
        whole, frac = divmod(src.weight, 1.0)
        pieces = [ds] * int(whole)
        if frac > 1e-9:
            pieces.append(ds.random_sample(frac, seed=seed + i))
        parts.extend(pieces)
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------- tokenization


class TokenizeRows:
    """``map_batches`` callable: JSON payloads -> token ids, or an error per row.

    The tokenizer is loaded once per actor, in ``__init__``.
    """

    def __init__(self, tokenizer_name: str, mode: str, max_length: int, truncation: str, trust_remote_code: bool):
        self.tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=trust_remote_code)
        self.mode = mode
        self.max_length = max_length
        self.truncation = truncation

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        keys = (
            ["input_ids", "labels"]
            if self.mode == "sft"
            else ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
        )
        out: dict[str, list] = {k: [] for k in (*keys, "source", "row", "error", "error_kind", "num_tokens")}
        if "split" in batch:  # pass-through tag (train/validation share one tokenizer pool)
            out["split"] = list(batch["split"])
        for source, row, payload in zip(batch["source"], batch["row"], batch["payload"], strict=True):
            source, row = str(source), int(row)
            tokens: dict[str, list[int]] = {k: [] for k in keys}
            error = kind = ""
            try:
                try:
                    obj = json.loads(payload)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        source, row, f"invalid JSON ({exc.msg} at column {exc.colno})", kind="invalid_json"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(
                        source, row, f"expected a JSON object, got {type(obj).__name__}", kind="invalid_json"
                    )
                tokens = tokenize_example(
                    self.tokenizer,
                    obj,
                    mode=self.mode,
                    max_length=self.max_length,
                    truncation=self.truncation,
                    source=source,
                    index=row,
                )
            except DataError as exc:
                error, kind = exc.reason, exc.kind
                tokens = {k: [] for k in keys}
            for k in keys:
                out[k].append(np.asarray(tokens[k], dtype=np.int32))
            out["source"].append(source)
            out["row"].append(row)
            out["error"].append(error)
            out["error_kind"].append(kind)
            out["num_tokens"].append(len(tokens[keys[0]]))
        return out


def tokenize_dataset(ds: ray.data.Dataset, cfg: TrainConfig) -> ray.data.Dataset:
    mode = "preference" if cfg.method.needs_pairs else "sft"
    return ds.map_batches(
        TokenizeRows,
        fn_constructor_args=(
            cfg.model.tokenizer or cfg.model.name,
            mode,
            cfg.data.max_length,
            cfg.data.truncation,
            cfg.model.trust_remote_code,
        ),
        batch_size=cfg.data.tokenize_batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.data.tokenize_concurrency),
        num_cpus=min(1.0, cfg.scaling.cpus_per_worker),
        batch_format="numpy",
    )


def collect_bad_rows(
    tokenized: ray.data.Dataset, on_bad_row: str
) -> tuple[BadRowReport, dict[str, int], dict[str, int]]:
    """Scan the (materialized) tokenized rows' small columns once.

    Raises on the first bad row (by file, row) under ``on_bad_row="error"``;
    otherwise counts them all.  Returns the report and, per split, the number of
    good rows and of tokens.
    """
    meta = tokenized.select_columns(["split", "source", "row", "error", "error_kind", "num_tokens"]).to_pandas()
    bad = meta[meta["error"] != ""].sort_values(["source", "row"])
    report = BadRowReport(seen=len(meta))
    if len(bad) and on_bad_row == "error":
        first = bad.iloc[0]
        more = f" ({len(bad) - 1} more bad rows; data.on_bad_row=skip skips and counts them)" if len(bad) > 1 else ""
        raise DataError(
            str(first["source"]), int(first["row"]), str(first["error"]) + more, kind=str(first["error_kind"])
        )
    for r in bad.itertuples():
        report.add(DataError(str(r.source), int(r.row), str(r.error), kind=str(r.error_kind)))
    good = meta[meta["error"] == ""]
    rows = good.groupby("split").size().to_dict()
    tokens = good.groupby("split")["num_tokens"].sum().to_dict()
    return report, {k: int(v) for k, v in rows.items()}, {k: int(v) for k, v in tokens.items()}


# --------------------------------------------------------------------------- fingerprints


def fingerprint_source(src: DataSource) -> str:
    """Content hash of a local source's files (or the hub id/split), 16 hex chars."""
    h = hashlib.sha256()
    if src.path.startswith("hf:"):
        h.update(f"{src.path}:{src.split}".encode())
    else:
        for f in expand_paths(src):
            h.update(f.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    h.update(f"{src.weight}:{src.max_rows}".encode())
    return h.hexdigest()[:16]


def fingerprint(sources: list[DataSource], cfg: TrainConfig) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(fingerprint_source(src).encode())
    h.update(f"{cfg.model.tokenizer or cfg.model.name}:{cfg.data.max_length}:{cfg.data.truncation}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- entry point


def prepare_datasets(cfg: TrainConfig) -> PreparedData:
    """Read, mix, tokenize, validate and shuffle the train and validation data.

    Train and validation rows go through one tokenizer pool in one pass (tagged
    with a ``split`` column); the train split gets one seeded global shuffle and
    epochs then reshuffle locally with ``seed + epoch``.
    """
    seed = cfg.optimization.seed
    parts = [mix_sources(cfg.data.train, seed).add_column("split", lambda b: _fill(b, "train"))]
    if cfg.data.validation:
        parts.append(mix_sources(cfg.data.validation, seed).add_column("split", lambda b: _fill(b, "validation")))
    raw = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    tokenized = tokenize_dataset(raw, cfg).materialize()
    report, rows, tokens = collect_bad_rows(tokenized, cfg.data.on_bad_row)

    def good(split: str) -> ray.data.Dataset:
        return tokenized.filter(expr=f"split == '{split}' and error == ''").drop_columns(
            ["split", "error", "error_kind"]
        )

    train = good("train").random_shuffle(seed=seed).materialize()
    validation = good("validation").materialize() if cfg.data.validation else None
    train_tokens = tokens.get("train", 0)
    if validation is None and cfg.data.validation_fraction > 0:
        train, validation = train.train_test_split(cfg.data.validation_fraction, shuffle=True, seed=seed)
        train, validation = train.materialize(), validation.materialize()
        train_tokens = int(train.sum("num_tokens") or 0)  # held-out rows are no training tokens
    fps = {"train": fingerprint(cfg.data.train, cfg)}
    if cfg.data.validation:
        fps["validation"] = fingerprint(cfg.data.validation, cfg)
    return PreparedData(
        train=train,
        validation=validation,
        train_rows=train.count(),
        validation_rows=validation.count() if validation is not None else 0,
        report=report,
        fingerprints=fps,
        train_tokens=train_tokens,
    )


def _fill(batch: Any, value: str):
    import pyarrow as pa

    return pa.array([value] * len(batch))
