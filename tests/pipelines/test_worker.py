"""pipelines.worker: how a Ray Train worker cuts its rows out of a global batch, and the
explicit fault-injection hook the reliability tests pass to ``train``."""

from __future__ import annotations

import multiprocessing

import numpy as np
import torch

from pipelines.worker import KillWorker, RankSliceCollate

PAD = 0


def global_batch() -> dict[str, np.ndarray]:
    """Four rows as Ray Data hands them over (ragged token columns as object arrays)."""
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    labels = [[-100, 6, 7], [-100, 9], [-100, -100, 12, 13], [14]]
    return {
        "input_ids": np.array([np.array(r) for r in ids], dtype=object),
        "labels": np.array([np.array(r) for r in labels], dtype=object),
        "source": np.array(["a.jsonl"] * 4),
        "row": np.array([0, 1, 2, 3]),
    }


def test_each_rank_takes_its_own_contiguous_micro_batch():
    rank0 = RankSliceCollate(0, 2, 2, PAD, keep_ids=False)(global_batch())
    rank1 = RankSliceCollate(1, 2, 2, PAD, keep_ids=False)(global_batch())
    assert rank0["input_ids"].tolist() == [[5, 6, 7], [8, 9, PAD]]
    assert rank1["input_ids"].tolist() == [[10, 11, 12, 13], [14, PAD, PAD, PAD]]


def test_a_ranks_slice_is_padded_with_masks_and_ignored_labels():
    out = RankSliceCollate(0, 2, 2, PAD, keep_ids=False)(global_batch())
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert "source" not in out and "row" not in out


def test_row_ids_travel_with_the_slice_when_asked():
    out = RankSliceCollate(1, 2, 2, PAD, keep_ids=True)(global_batch())
    assert out["source"] == ["a.jsonl", "a.jsonl"]
    assert torch.equal(out["row"], torch.tensor([2, 3]))


def _fire(fault: KillWorker, step: int, rank: int) -> None:
    fault(step, rank)


def _exit_code(fault: KillWorker, step: int, rank: int) -> int:
    proc = multiprocessing.get_context("fork").Process(target=_fire, args=(fault, step, rank))
    proc.start()
    proc.join(30)
    return proc.exitcode


def test_the_fault_kills_only_the_named_rank_at_the_named_step_and_only_once(tmp_path):
    fault = KillWorker(step=6, rank=1, marker=str(tmp_path / "fired"))
    assert _exit_code(fault, step=6, rank=0) == 0
    assert _exit_code(fault, step=5, rank=1) == 0
    assert _exit_code(fault, step=6, rank=1) == 1
    assert (tmp_path / "fired").exists()
    assert _exit_code(fault, step=6, rank=1) == 0  # the restarted worker group runs on
