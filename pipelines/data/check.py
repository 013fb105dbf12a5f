"""``ift data check``: every row of a config's sources read and tokenized as training would, in this
process, without Ray.

The rows come from the readers training streams from (:func:`pipelines.data.sources.read_shard`, a
whole file as one shard, so nothing is scanned first); each is parsed and tokenized with the
config's tokenizer, data mode, ``max_length``, ``truncation`` and chat template
(:func:`ift.data.parse_json_row`, :func:`ift.data.tokenize_example`, as
:class:`pipelines.data.tokenize.TokenizeRows` does on Ray Data).  One row at a time: the memory
does not grow with the corpus.  The :class:`CheckReport` counts rows, files, bad rows by reason,
rows truncated to ``max_length`` and those whose whole prompt was cut, and keeps the first
``max_errors`` bad rows (with file and line) and the number of the rest.

Weights and ``max_rows`` do not apply: every row of every source is checked once, a file named by
several sources (train and validation) once.  Local files and ``hf:`` hub datasets (from the local
hub cache) are both read here.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ift.data import BadRowReport, DataError, TruncationStats, parse_json_row, tokenize_example
from pipelines.config import TrainConfig
from pipelines.data.batching import data_mode
from pipelines.data.files import list_files
from pipelines.data.sources import Shard, read_shard, scan_source

MAX_ERRORS = 20  # bad rows listed; the rest are counted


@dataclass
class CheckReport:
    """What ``ift data check`` found: counts, and the first ``max_errors`` bad rows."""

    max_length: int
    truncation: str
    max_errors: int = MAX_ERRORS
    files: int = 0
    counts: BadRowReport = field(default_factory=lambda: BadRowReport(max_samples=0))
    bad: list[DataError] = field(default_factory=list)  # the first max_errors bad rows
    bad_rows_path: str | None = None  # where every bad row was written, one JSON object per line

    @property
    def rows(self) -> int:
        return self.counts.seen

    @property
    def bad_rows(self) -> int:
        return self.counts.skipped

    @property
    def more_bad_rows(self) -> int:
        """Bad rows counted but not listed."""
        return self.bad_rows - len(self.bad)

    def add_bad(self, error: DataError) -> None:
        self.counts.add(error)
        if len(self.bad) < self.max_errors:
            self.bad.append(error)

    def summary(self) -> str:
        """``checked 13 rows in 2 files: 1 bad (1 invalid_json), 3 truncated to max_length=512 (...)``."""
        c = self.counts
        files = f"{self.files} file{'' if self.files == 1 else 's'}"
        reasons = ", ".join(f"{n:,} {kind}" for kind, n in sorted(c.counts.items()))
        bad = f"{c.skipped:,} bad" + (f" ({reasons})" if reasons else "")
        return f"checked {c.seen:,} rows in {files}: {bad}, {self._truncation_text()}"

    def _truncation_text(self) -> str:
        c, limit = self.counts, f"max_length={self.max_length}"
        if self.truncation == "drop":
            return f"none truncated (data.truncation=drop: a row over {limit} is a bad row, too_long)"
        if not c.truncated:
            return f"none truncated to {limit}"
        cut = f"{c.prompt_cut:,} with the whole prompt cut; " if c.prompt_cut else ""
        return f"{c.truncated:,} truncated to {limit} ({cut}see data.truncation)"

    def lines(self) -> list[str]:
        """The summary, then one line per listed bad row (``file line N: reason``), then how many more."""
        out = [self.summary(), *(str(e) for e in self.bad)]
        if self.more_bad_rows:
            out.append(f"... and {self.more_bad_rows:,} more bad rows (--max-errors N lists more)")
        if self.bad_rows_path and self.bad_rows:
            out.append(f"every bad row, one JSON object per line: {self.bad_rows_path}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report for scripts (``ift data check --json``)."""
        c = self.counts
        return {
            "rows": c.seen, "files": self.files, "bad_rows": c.skipped, "by_reason": dict(sorted(c.counts.items())),
            "truncated": c.truncated, "prompt_cut": c.prompt_cut, "max_length": self.max_length,
            "truncation": self.truncation, "more_bad_rows": self.more_bad_rows, "bad_rows_file": self.bad_rows_path,
            "bad": [_as_dict(e) for e in self.bad],
        }  # fmt: skip


def check_shards(cfg: TrainConfig) -> list[Shard]:
    """One shard per distinct file (or hub dataset) of the config's train and validation sources."""
    out: dict[str, Shard] = {}
    for src in [*cfg.data.train, *cfg.data.validation]:
        if src.path.startswith("hf:"):
            shards = [Shard(scan.path, "hf", 0, scan.rows) for scan in scan_source(src)]
        else:  # the whole file: its reader stops at the end, so nothing is scanned first
            shards = [Shard(f.path, f.format, 0, sys.maxsize) for f in list_files(src.path)]
        out.update((s.path, s) for s in shards if s.path not in out)
    return list(out.values())


def _tokenizer(cfg: TrainConfig) -> Any:
    from ift.tokenization import load_tokenizer  # transformers: loaded when a check runs, not on import

    return load_tokenizer(
        cfg.model.tokenizer or cfg.model.name,
        trust_remote_code=cfg.model.trust_remote_code,
        chat_template=cfg.data.chat_template,
    )


def _row_error(tokenizer: Any, item: dict[str, Any], cfg: TrainConfig, mode: str, stats: TruncationStats):
    """The row's :class:`DataError` (named by file and line), or None with ``stats`` set for a good row."""
    source, row, line = str(item["source"]), int(item["row"]), int(item["line"]) or None
    try:
        obj = parse_json_row(item["payload"], source, row, line=line)
        tokenize_example(
            tokenizer, obj, mode=mode, max_length=cfg.data.max_length, truncation=cfg.data.truncation,
            source=source, index=row, stats=stats,
        )  # fmt: skip
    except DataError as exc:
        return exc if exc.line == line else DataError(source, row, exc.reason, kind=exc.kind, line=line)
    return None


def rows(shards: list[Shard]) -> Iterator[dict[str, Any]]:
    """Every row of the shards, in order, as ``{source, row, line, payload}``."""
    for shard in shards:
        yield from read_shard(shard.to_item())


def check(
    cfg: TrainConfig, *, max_errors: int = MAX_ERRORS, tokenizer: Any = None, bad_rows_path: str | Path | None = None
) -> CheckReport:
    """Check every row of ``cfg``'s sources (a missing source raises :class:`ift.data.DataError`).

    Memory stays flat whatever the corpus: rows stream through one at a time, the report keeps the
    counts and the first ``max_errors`` bad rows, and every bad row goes to ``bad_rows_path`` (JSONL,
    written as found; created only when there is a bad row)."""
    shards = check_shards(cfg)
    report = CheckReport(cfg.data.max_length, cfg.data.truncation, max_errors=max_errors, files=len(shards))
    tokenizer = tokenizer if tokenizer is not None else _tokenizer(cfg)
    mode, stats = data_mode(cfg), TruncationStats()
    with contextlib.ExitStack() as stack:
        out = None
        for item in rows(shards):
            report.counts.seen += 1
            error = _row_error(tokenizer, item, cfg, mode, stats)
            if error is None:
                report.counts.count_truncation(stats)
                continue
            report.add_bad(error)
            if bad_rows_path is not None:
                if out is None:
                    out = stack.enter_context(open(bad_rows_path, "w", encoding="utf-8"))
                    report.bad_rows_path = str(bad_rows_path)
                out.write(json.dumps(_as_dict(error)) + "\n")
    return report


def _as_dict(e: DataError) -> dict[str, Any]:
    return {"source": e.source, "row": e.row, "line": e.line, "kind": e.kind, "reason": e.reason}
