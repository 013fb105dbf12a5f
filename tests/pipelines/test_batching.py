"""pipelines.batching: one rank's rows -> micro-batches of exactly B good examples, bad rows stopped or counted."""

from __future__ import annotations

import numpy as np
import pytest

from ift.data import DataError
from pipelines.batching import MicroBatches

KEYS = ("input_ids", "labels")


def row_batch(rows: list[tuple[int, list[int], str]], source: str = "a.jsonl") -> dict[str, np.ndarray]:
    """Rows as Ray Data hands them over: (row, token ids, error)."""
    ids = np.empty(len(rows), dtype=object)
    ids[:] = [np.asarray(t, dtype=np.int32) for _, t, _ in rows]
    return {
        "source": np.array([source] * len(rows)),
        "row": np.array([r for r, _, _ in rows]),
        "line": np.array([r + 1 for r, _, _ in rows]),
        "input_ids": ids,
        "labels": ids.copy(),
        "error": np.array([e for _, _, e in rows]),
        "error_kind": np.array(["empty" if e else "" for _, _, e in rows]),
    }


def batches(on_bad_row: str = "skip", **kwargs) -> MicroBatches:
    stream = [
        row_batch([(0, [1, 2, 3], ""), (1, [], "messages[1] (assistant) is empty"), (2, [4], "")]),
        row_batch([(3, [5, 6], ""), (4, [7], ""), (5, [8], "")]),
    ]
    return MicroBatches(stream, token_keys=KEYS, micro_batch_size=2, pad_token_id=0, on_bad_row=on_bad_row, **kwargs)


def test_good_rows_fill_micro_batches_of_exactly_b_examples_and_the_short_tail_is_dropped():
    out = list(batches())
    assert [b["input_ids"].tolist() for b in out] == [[[1, 2, 3], [4, 0, 0]], [[5, 6], [7, 0]]]


def test_skipped_rows_are_counted_with_their_reason_and_every_row_read_is_counted():
    mb = batches()
    list(mb)
    assert mb.stats.rows_read == 6 and mb.stats.examples == 4
    assert mb.stats.skipped.to_dict()["by_reason"] == {"empty": 1}
    assert mb.stats.skipped.samples == [("a.jsonl", 1, "messages[1] (assistant) is empty")]


def test_under_error_the_first_bad_row_stops_with_its_file_and_line():
    with pytest.raises(DataError) as err:
        list(batches("error"))
    assert str(err.value) == "a.jsonl line 2: messages[1] (assistant) is empty"


def test_padding_fraction_is_padding_over_every_position():
    mb = batches()
    list(mb)
    # Positions: 2x3 + 2x2 = 10; tokens 3+1+2+1 = 7.
    assert (mb.stats.tokens, mb.stats.positions) == (7, 10) and mb.stats.padding_fraction == pytest.approx(0.3)


def test_the_last_short_batch_is_kept_when_asked_with_row_ids():
    out = list(batches(drop_last=False, keep_ids=True))
    assert len(out) == 3 and out[-1]["source"] == ["a.jsonl"] and out[-1]["row"].tolist() == [5]
