"""One rank's stream of tokenized rows -> micro-batches (padded or packed), with the bad-row policy applied.

Ray Data hands a worker batches of rows (numpy columns, ``META_KEYS`` plus token
columns).  :class:`MicroBatches` drops nothing silently: a row with an ``error``
stops the epoch with a :class:`ift.data.DataError` naming its file and line
(``on_bad_row="error"``) or is skipped and counted in :attr:`EpochStats.skipped`
(``"skip"``).  Good rows become micro-batches in one of two layouts
(:mod:`ift.collate`):

* padded: exactly ``micro_batch_size`` examples, right-padded (the last, short
  one is dropped, as the schedule assumes);
* packed (a :class:`Packing` given): windows of ``Packing.window`` examples are
  bin-packed into rows of at most ``Packing.length`` tokens, and every
  ``Packing.rows`` rows make one micro-batch (rows left at a window's end wait
  for the next window's; a preference pair stays in one row).  So a packed
  micro-batch has the shape of a padded one at full length, filled with real
  tokens.  The number of rows is not known before the pass, so the schedule
  uses :func:`estimate_examples_per_pack` and the epoch ends when the first
  rank's stream runs out (``pipelines.training.loop``).

Every micro-batch carries ``num_examples`` and ``num_tokens`` (real tokens of
the main sequences: ``input_ids``, or ``chosen_input_ids`` for pairs) for the
loop's accounting.  No Ray here: any iterable of row batches works, so the tests
drive it with lists.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ift.collate import collate_packs, join_pack, pack_examples, pad_collate
from ift.data import BadRowReport, DataError
from pipelines.config import TrainConfig

SFT_KEYS = ("input_ids", "labels")
PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def token_keys(mode: str) -> tuple[str, ...]:
    return SFT_KEYS if mode == "sft" else PAIR_KEYS


def data_mode(cfg: TrainConfig) -> str:
    """``"preference"`` for methods that train on pairs, else ``"sft"``."""
    return "preference" if cfg.method.paired else "sft"


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


@dataclass(frozen=True)
class Packing:
    """How a rank packs: ``window`` examples at a time into rows of at most ``length`` tokens,
    ``rows`` rows per micro-batch."""

    length: int
    rows: int = 1
    strategy: str = "best_fit_decreasing"
    window: int = 1024


def packing_of(cfg: TrainConfig):
    """The config's :class:`pipelines.data.batching.Packing`, or None for padded micro-batches."""
    if not cfg.data.packing:
        return None
    return Packing(
        length=cfg.data.resolved_pack_length(cfg.method.paired),
        rows=cfg.optimization.micro_batch_size,
        strategy=cfg.data.packing_strategy,
        window=cfg.data.packing_window,
    )


def estimate_examples_per_pack(examples: list[dict[str, Any]], packing: Packing) -> float:
    """Mean examples per pack when ``examples`` (a sample of the corpus) are packed window by window.

    The schedule divides a split's rows by this to count micro-batches before any pass over the
    data; the sample should hold a few windows.
    """
    if not examples:
        raise ValueError("cannot estimate packing from an empty sample")
    packs = sum(
        len(pack_examples(examples[i : i + packing.window], packing.length, strategy=packing.strategy))
        for i in range(0, len(examples), packing.window)
    )
    return len(examples) / packs


def row_error(batch: dict[str, np.ndarray], i: int) -> DataError:
    line = int(batch["line"][i]) if "line" in batch else 0
    return DataError(
        str(batch["source"][i]), int(batch["row"][i]), str(batch["error"][i]), kind=str(batch["error_kind"][i]),
        line=line or None,
    )  # fmt: skip


class MicroBatches:
    """Iterate ``row_batches`` as micro-batches of good examples: padded, ``micro_batch_size`` each,
    or packed, one pack per micro-batch (``packing``).

    The last, short padded micro-batch is dropped unless ``drop_last=False`` (packing keeps every
    pack).  ``keep_ids`` adds each example's ``source`` (list) and ``row`` (tensor), in the batch's
    sequence order, which DPO's precomputed reference table is keyed by.
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
        packing: Packing | None = None,
    ) -> None:
        self.row_batches = row_batches
        self.token_keys = token_keys
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self.on_bad_row = on_bad_row
        self.keep_ids = keep_ids
        self.drop_last = drop_last
        self.packing = packing
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
        if self.packing is not None:
            yield from self._packed()
            return
        pending: list[tuple[dict[str, list[int]], str, int]] = []
        for example in self._examples():
            pending.append(example)
            if len(pending) == self.micro_batch_size:
                yield self._collate(pending)
                pending = []
        if pending and not self.drop_last:
            yield self._collate(pending)

    def _packed(self) -> Iterator[dict[str, Any]]:
        assert self.packing is not None
        p = self.packing
        rows: list[list[tuple[dict[str, list[int]], str, int]]] = []  # packed rows not yet batched
        examples = self._examples()
        while True:
            window = list(itertools.islice(examples, p.window))
            for group in pack_examples([e for e, _, _ in window], p.length, strategy=p.strategy) if window else []:
                rows.append([window[i] for i in group])
            while len(rows) >= p.rows or (rows and len(window) < p.window):  # full, or the stream's last rows
                yield self._collate_packs(rows[: p.rows])
                rows = rows[p.rows :]
            if len(window) < p.window:
                return

    def _account(self, out: dict[str, Any], examples: list[tuple[dict[str, list[int]], str, int]]) -> None:
        """Counts for the epoch's stats and the loop; ``source``/``row`` when asked."""
        main = "input_ids" if "input_ids" in self.token_keys else "chosen_input_ids"
        real = {k: sum(len(e[k]) for e, _, _ in examples) for k in self.token_keys if k.endswith("input_ids")}
        self.stats.examples += len(examples)
        self.stats.tokens += sum(real.values())
        self.stats.positions += sum(v.numel() for k, v in out.items() if k.endswith("input_ids"))
        out["num_examples"] = len(examples)
        out["num_tokens"] = real[main]
        if self.keep_ids:
            out["source"] = [s for _, s, _ in examples]
            out["row"] = torch.tensor([r for _, _, r in examples], dtype=torch.int64)

    def _collate(self, examples: list[tuple[dict[str, list[int]], str, int]]) -> dict[str, Any]:
        out: dict[str, Any] = pad_collate([e for e, _, _ in examples], self.pad_token_id)
        self._account(out, examples)
        return out

    def _collate_packs(self, rows: list[list[tuple[dict[str, list[int]], str, int]]]) -> dict[str, Any]:
        out: dict[str, Any] = collate_packs([join_pack([e for e, _, _ in row]) for row in rows], self.pad_token_id)
        self._account(out, [example for row in rows for example in row])
        return out
