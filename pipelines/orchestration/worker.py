"""Ray Train's entry point on every worker: Ray Train adapted to :class:`pipelines.training.recipe.TrainingRecipe`.

:class:`RayTrainRuntime` is what the recipe sees of Ray Train: the rank, the checkpoint to resume
from, this rank's share of each streamed split (Ray Train's ``streaming_split``: equal rows per
rank, in a deterministic order), reports with checkpoints, and the driver's progress actor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray
import ray.data
import ray.train

from pipelines.training.recipe import RecipeHooks, RecipeSpec, TrainingRecipe


class RayTrainRuntime:
    """The :class:`pipelines.training.recipe.WorkerRuntime` of a Ray Train worker."""

    def __init__(self, progress: Any):
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.progress = progress  # pipelines.orchestration.progress.ProgressTracker (on the driver's node)

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        checkpoint = ray.train.get_checkpoint()  # the latest one Ray Train committed, on a retry
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def rows(self, split: str, *, batch_size: int, shuffle_buffer: int, shuffle_seed: int | None) -> Iterable[Any]:
        return ray.train.get_dataset_shard(split).iter_batches(
            batch_size=batch_size, batch_format="numpy",
            local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=shuffle_seed,
        )  # fmt: skip

    def report(
        self, metrics: dict[str, float], checkpoint_dir: str | None = None, upload: Callable | None = None
    ) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload)

    def wait_until_committed(self) -> None:
        # Ray Train takes one report per controller poll (a queue of one): an empty report returns once
        # the controller has taken the checkpoint's, so a worker lost after this resumes from it.
        ray.train.report({})

    def show_progress(self, step: int, metrics: dict[str, float]) -> None:
        self.progress.update.remote(step, metrics)  # fire and forget: the bar must not slow training

    def set_outcome(self, key: str, value: Any) -> None:
        ray.get(self.progress.set_outcome.remote(key, value))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: the recipe's phases, in order, on this worker.

    ``loop_config``: ``spec`` (a :class:`RecipeSpec`), ``progress`` (the driver's progress actor) and
    ``hooks`` (a :class:`RecipeHooks`; test hooks only, see :mod:`pipelines.orchestration.hooks`).
    """
    # Ray Data's per-iteration bars would interleave with the driver's progress bar.
    ray.data.DataContext.get_current().enable_progress_bars = False
    spec: RecipeSpec = loop_config["spec"]
    hooks: RecipeHooks = loop_config.get("hooks") or RecipeHooks()
    recipe = TrainingRecipe(spec, RayTrainRuntime(loop_config["progress"]), hooks)
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()
