"""One rank's stream of tokenized rows -> padded micro-batches, with the bad-row policy applied.

Ray Data hands a worker batches of rows (numpy columns, ``META_KEYS`` plus token
columns).  :class:`MicroBatches` drops nothing silently: a row with an ``error``
stops the epoch with a :class:`ift.data.DataError` naming its file and line
(``on_bad_row="error"``) or is skipped and counted in :attr:`EpochStats.skipped`
(``"skip"``).  Good rows are collected into micro-batches of exactly
``micro_batch_size`` examples (the last, short one is dropped, as the schedule
assumes).  No Ray here: any iterable of row batches works, so the tests drive it
with lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ift.collate import pad_collate
from ift.data import BadRowReport, DataError


@dataclass
class EpochStats:
    """What one rank read in one epoch."""

    rows_read: int = 0  # rows taken from the stream, bad ones and those skipped to resume included
    examples: int = 0  # good rows batched
    tokens: int = 0  # non-padding tokens of the micro-batches
    positions: int = 0  # every position of the micro-batches (tokens + padding)
    skipped: BadRowReport = field(default_factory=BadRowReport)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.positions if self.positions else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read, "examples": self.examples, "tokens": self.tokens,
            "positions": self.positions, "skipped": self.skipped.to_dict(),
        }  # fmt: skip


def row_error(batch: dict[str, np.ndarray], i: int) -> DataError:
    line = int(batch["line"][i]) if "line" in batch else 0
    return DataError(
        str(batch["source"][i]), int(batch["row"][i]), str(batch["error"][i]), kind=str(batch["error_kind"][i]),
        line=line or None,
    )  # fmt: skip


class MicroBatches:
    """Iterate ``row_batches`` as padded micro-batches of ``micro_batch_size`` good examples.

    The last, short micro-batch is dropped unless ``drop_last=False``.  ``keep_ids``
    adds each example's ``source`` (list) and ``row`` (tensor), which DPO's
    precomputed reference table is keyed by.
    """

    def __init__(
        self,
        row_batches: Iterable[dict[str, np.ndarray]],
        *,
        token_keys: tuple[str, ...],
        micro_batch_size: int,
        pad_token_id: int,
        on_bad_row: str,
        keep_ids: bool = False,
        drop_last: bool = True,
    ) -> None:
        self.row_batches = row_batches
        self.token_keys = token_keys
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self.on_bad_row = on_bad_row
        self.keep_ids = keep_ids
        self.drop_last = drop_last
        self.stats = EpochStats()

    def _examples(self) -> Iterator[tuple[dict[str, list[int]], str, int]]:
        for batch in self.row_batches:
            n = len(batch["row"])
            self.stats.rows_read += n
            for i in range(n):
                self.stats.skipped.seen += 1
                if batch["error"][i]:
                    err = row_error(batch, i)
                    if self.on_bad_row == "error":
                        raise err
                    self.stats.skipped.add(err)
                    continue
                yield {k: batch[k][i].tolist() for k in self.token_keys}, str(batch["source"][i]), int(batch["row"][i])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pending: list[tuple[dict[str, list[int]], str, int]] = []
        for example in self._examples():
            pending.append(example)
            if len(pending) == self.micro_batch_size:
                yield self._collate(pending)
                pending = []
        if pending and not self.drop_last:
            yield self._collate(pending)

    def _collate(self, examples: list[tuple[dict[str, list[int]], str, int]]) -> dict[str, Any]:
        out: dict[str, Any] = pad_collate([e for e, _, _ in examples], self.pad_token_id)
        masks = [k for k in out if k.endswith("attention_mask")]
        self.stats.examples += len(examples)
        self.stats.tokens += int(sum(int(out[k].sum()) for k in masks))
        self.stats.positions += int(sum(out[k].numel() for k in masks))
        if self.keep_ids:
            out["source"] = [s for _, s, _ in examples]
            out["row"] = torch.tensor([r for _, _, r in examples], dtype=torch.int64)
        return out
