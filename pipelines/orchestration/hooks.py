"""Test hooks: faults injected into a training run, and the row ids of every micro-batch.

Each is a :class:`pipelines.training.recipe.RecipeHooks`, the recipe's one hook point, passed
explicitly as ``train(cfg, hooks=...)``; production runs carry the no-op base.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train

from pipelines.training.recipe import Batch, RecipeHooks
from pipelines.training.state import STATE_FILE


@dataclass(frozen=True)
class KillWorker(RecipeHooks):
    """A test hook: kill the worker of ``rank`` (``os._exit``) right after optimizer step ``step``,
    or, ``while_saving``, in the middle of uploading its part of that step's checkpoint.

    Passed explicitly as ``train(cfg, hooks=KillWorker(...))``; production runs never
    carry one.  The marker file makes it fire once, so the restarted group runs on.
    """

    step: int
    rank: int
    marker: str
    while_saving: bool = False

    def _fires(self, step: int, rank: int) -> bool:
        return step == self.step and rank == self.rank and not os.path.exists(self.marker)

    def after_step(self, step: int, rank: int) -> None:
        if not self.while_saving and self._fires(step, rank):
            open(self.marker, "w").close()
            os._exit(1)

    def checkpoint_upload(self, step: int, rank: int) -> Callable[[ray.train.Checkpoint, str], Any] | None:
        """For ``ray.train.report``: an upload that dies halfway, once rank 0's loop state is in the
        checkpoint's folder (so the folder looks like a checkpoint), with half of each of this rank's
        files written.  None (Ray's own upload) at every other step and rank."""
        if not (self.while_saving and self._fires(step, rank)):
            return None

        def die_mid_upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> Any:
            storage = ray.train.get_context().get_storage()
            fs, dest = storage.storage_filesystem, storage.build_checkpoint_path_from_name(dir_name)
            deadline = time.monotonic() + 120
            while fs.get_file_info(f"{dest}/{STATE_FILE}").type != pafs.FileType.File:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank 0 never uploaded {dest}/{STATE_FILE}")
                time.sleep(0.1)
            for parent, _, files in os.walk(checkpoint.path):
                for name in files:
                    local = os.path.join(parent, name)
                    remote = f"{dest}/{os.path.relpath(local, checkpoint.path)}"
                    fs.create_dir(os.path.dirname(remote))
                    with open(local, "rb") as src, fs.open_output_stream(remote) as out:
                        out.write(src.read()[: os.path.getsize(local) // 2])
            open(self.marker, "w").close()
            os._exit(1)

        return die_mid_upload


@dataclass(frozen=True)
class StallWorker(RecipeHooks):
    """A test hook: the worker of ``rank`` writes its Ray node id to ``marker`` right after optimizer
    step ``step`` and stalls, as a worker on a failing machine does, until the test takes its node away."""

    step: int
    rank: int
    marker: str

    def after_step(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank and not os.path.exists(self.marker):
            with open(self.marker + ".tmp", "w") as f:
                f.write(ray.get_runtime_context().get_node_id())
            os.replace(self.marker + ".tmp", self.marker)
            time.sleep(3600)


@dataclass(frozen=True)
class TraceBatches(RecipeHooks):
    """Each rank appends each training micro-batch's row ids, as (epoch, index in epoch,
    [[source, row], ...]), to ``trace_dir/rank<r>.jsonl`` as it takes it (a re-read after a resume
    appears again)."""

    trace_dir: str
    keeps_row_ids = True

    def batches(self, batches: Iterable[Batch], epoch: int, rank: int) -> Iterable[Batch]:
        path = os.path.join(self.trace_dir, f"rank{rank}.jsonl")
        for i, batch in enumerate(batches):
            ids = [[os.path.basename(s), int(r)] for s, r in zip(batch["source"], batch["row"].tolist(), strict=True)]
            with open(path, "a") as f:
                f.write(json.dumps({"epoch": epoch, "micro": i, "rows": ids}) + "\n")
            yield batch
