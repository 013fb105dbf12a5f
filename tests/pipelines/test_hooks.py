"""The recipe's per-rank shuffle seed, and the test hooks the reliability tests pass to ``train``
(pipelines.orchestration.hooks).  (Micro-batching is tests/pipelines/test_batching.py.)"""

from __future__ import annotations

import multiprocessing

from pipelines.orchestration.hooks import KillWorker
from pipelines.training.recipe import RecipeHooks, shuffle_seed


def test_each_rank_shuffles_with_its_own_seed_and_each_epoch_anew():
    seeds = {shuffle_seed(42, epoch, rank) for epoch in (0, 1) for rank in (0, 1, 2)}
    assert len(seeds) == 6 and shuffle_seed(42, 1, 0) == shuffle_seed(42, 1, 0)


def _fire(fault: KillWorker, step: int, rank: int) -> None:
    fault.after_step(step, rank)


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


def test_the_production_hooks_do_nothing(tmp_path):
    hooks = RecipeHooks()
    batches = [{"input_ids": 1}]
    assert hooks.batches(batches, epoch=0, rank=0) is batches
    assert hooks.checkpoint_upload(step=1, rank=0) is None
    assert _exit_code(hooks, step=1, rank=0) == 0 and not hooks.keeps_row_ids
