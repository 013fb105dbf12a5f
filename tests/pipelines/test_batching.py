"""pipelines.data.batching: one rank's rows -> micro-batches (B padded examples, or B packed rows); bad rows
stopped or counted."""

from __future__ import annotations

import numpy as np
import pytest

from ift.data import DataError
from pipelines.data.batching import MicroBatches, Packing, estimate_examples_per_pack

KEYS = ("input_ids", "labels")
PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


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


# --------------------------------------------------------------------------- packing


def pair_batch(rows: list[tuple[int, list[int], list[int]]]) -> dict[str, np.ndarray]:
    """Preference rows as Ray Data hands them over: (row, chosen ids, rejected ids)."""

    def column(values: list[list[int]]) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = [np.asarray(v, dtype=np.int32) for v in values]
        return out

    chosen, rejected = column([c for _, c, _ in rows]), column([r for _, _, r in rows])
    return {
        "source": np.array(["p.jsonl"] * len(rows)), "row": np.array([r for r, _, _ in rows]),
        "chosen_input_ids": chosen, "chosen_labels": chosen.copy(),
        "rejected_input_ids": rejected, "rejected_labels": rejected.copy(),
        "error": np.array([""] * len(rows)), "error_kind": np.array([""] * len(rows)),
    }  # fmt: skip


def packed(stream, length: int, window: int = 8, keys=KEYS, rows: int = 1, **kwargs) -> MicroBatches:
    return MicroBatches(
        stream, token_keys=keys, micro_batch_size=rows, pad_token_id=0, on_bad_row="skip",
        packing=Packing(length=length, rows=rows, window=window), **kwargs,
    )  # fmt: skip


def test_packing_makes_one_row_per_micro_batch_with_best_fit_and_no_padding():
    # Good rows (lengths): 0 (3), 2 (1), 3 (2), 4 (1), 5 (1); best fit decreasing into 4 tokens:
    # [3, 1] and [2, 1, 1], ordered by their first row.
    out = list(packed(batches().row_batches, length=4, keep_ids=True))
    assert [b["row"].tolist() for b in out] == [[0, 2], [3, 4, 5]]
    assert [b["input_ids"].tolist() for b in out] == [[[1, 2, 3, 4]], [[5, 6, 7, 8]]]
    assert [b["position_ids"].tolist() for b in out] == [[[0, 1, 2, 0]], [[0, 1, 0, 0]]]
    assert [b["labels"].tolist() for b in out] == [[[-100, 2, 3, -100]], [[-100, 6, -100, -100]]]
    assert "attention_mask" not in out[0]
    assert [(b["num_examples"], b["num_tokens"]) for b in out] == [(2, 4), (3, 4)]


def test_a_packed_stream_has_no_padding_and_counts_every_good_example():
    mb = packed(batches().row_batches, length=4)
    list(mb)
    assert (mb.stats.examples, mb.stats.tokens, mb.stats.positions) == (5, 8, 8) and mb.stats.padding_fraction == 0
    assert mb.stats.skipped.skipped == 1


def test_packing_works_window_by_window_in_stream_order():
    # A window of 2 examples: rows 0+2, then 3+4, then 5 alone (nothing crosses a window).
    out = list(packed(batches().row_batches, length=8, window=2, keep_ids=True))
    assert [b["row"].tolist() for b in out] == [[0, 2], [3, 4], [5]]


def test_a_micro_batch_is_b_packed_rows_and_rows_left_at_a_window_end_wait_for_the_next_window():
    # Windows of 2 good examples into rows of 3 tokens: rows 0, 2 (3 and 1 tokens) -> rows [0] and [2];
    # rows 3, 4 (2 and 1) -> one row [3, 4]; row 5 alone -> [5].  Two rows per micro-batch:
    # [0] + [2], then [3, 4] (left from its window) + [5].
    out = list(packed(batches().row_batches, length=3, window=2, rows=2, keep_ids=True))
    assert [b["row"].tolist() for b in out] == [[0, 2], [3, 4, 5]]
    assert out[0]["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]  # rows padded to one length: the short one
    assert out[0]["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]  # its tail continues its positions
    assert out[1]["input_ids"].shape == (2, 3) and out[1]["num_examples"] == 3


def test_a_pair_is_packed_whole_its_chosen_and_rejected_side_by_side():
    stream = [pair_batch([(0, [1, 2], [3]), (1, [4], [5, 6, 7]), (2, [8, 9, 10], [11])])]
    out = list(packed(stream, length=5, keys=PAIR_KEYS, keep_ids=True))
    # Pair sizes (chosen + rejected) 3, 4, 4 into rows of 5: each pair alone, in row order.
    assert [b["row"].tolist() for b in out] == [[0], [1], [2]]
    assert out[1]["pair_input_ids"].tolist() == [[4, 5, 6, 7]]
    assert out[1]["pair_position_ids"].tolist() == [[0, 0, 1, 2]]
    assert out[0]["num_tokens"] == 2  # the chosen sequences' real tokens
    two = list(packed(stream, length=8, keys=PAIR_KEYS, keep_ids=True))
    # Into rows of 8, best fit decreasing: pairs 1 and 2 (4 + 4) fill one row, pair 0 takes another.
    assert [b["row"].tolist() for b in two] == [[0], [1, 2]]
    assert two[1]["pair_input_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]


def test_examples_per_pack_is_estimated_window_by_window():
    # Lengths 3, 3, 2, 2 into 5 tokens: [3, 2] and [3, 2] -> 2 examples per pack; with windows
    # of 2 ([3, 3] and [2, 2]) nothing pairs up but the 2s: 3 packs for 4 examples.
    sample = [{"input_ids": [0] * n, "labels": [0] * n} for n in (3, 3, 2, 2)]
    assert estimate_examples_per_pack(sample, Packing(length=5, window=4)) == 2.0
    assert estimate_examples_per_pack(sample, Packing(length=5, window=2)) == pytest.approx(4 / 3)
