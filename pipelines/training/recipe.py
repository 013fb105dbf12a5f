"""The training recipe every worker runs: ``setup`` → ``train`` → ``save_checkpoint`` → ``cleanup``.

One recipe serves every method, ``ift train`` and every sweep trial.  It is plain PyTorch +
DeepSpeed and imports no Ray: what it needs from the process group it runs in (its rank, its
rows of each split, somewhere to report metrics and checkpoints, the run's progress bar) comes
through a :class:`WorkerRuntime`, which Ray Train provides in
:class:`pipelines.orchestration.worker.RayTrainRuntime`.

Per optimizer step (:meth:`TrainingRecipe.on_step`) the recipe does four named things, each a
method of its own: the test hook, the progress bar, MLflow logging (rank 0), and a checkpoint or
a report.  Data: each rank iterates its own share of the streamed corpus; the per-epoch local
shuffle is seeded per epoch and rank (:func:`shuffle_seed`); :class:`pipelines.data.batching.MicroBatches`
turns rows into micro-batches and applies the bad-row policy.  A resume re-reads the epoch's stream
and skips the micro-batches already trained (refused when the world size or the data changed).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ift.data import BadRowReport, DataError
from ift.lora import parameter_counts
from pipelines.config import TrainConfig
from pipelines.data.batching import MicroBatches, Packing, data_mode, packing_of, token_keys
from pipelines.tracking.runs import RunLogger
from pipelines.training.build import attention, build_engine, build_model_and_tokenizer, partitioned_reference
from pipelines.training.export import export_hf_model
from pipelines.training.host_memory import return_freed_memory
from pipelines.training.loop import StreamDataError, precompute_reference_table, run_training
from pipelines.training.methods import build_objective
from pipelines.training.state import ADAPTER_DIR, DS_TAG, HF_MODEL_DIR, LoopState, Schedule

Batch = dict[str, Any]


@dataclass(frozen=True)
class RecipeSpec:
    """What the driver decided and every worker trains with (sent once, validated on the driver)."""

    config: TrainConfig
    schedule: Schedule
    use_gpu: bool
    data_fingerprint: str  # what a saved data position counts in (state.data_position_fingerprint)
    has_validation: bool
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None  # rank 0 logs into this run (the driver started it)
    # Report every logged step to the runtime too (a sweep ranking trials by a training metric).
    report_each_log_step: bool = False


class WorkerRuntime(Protocol):
    """What the recipe needs from the process group it runs in (Ray Train:
    :class:`pipelines.orchestration.worker.RayTrainRuntime`)."""

    rank: int
    world_size: int
    local_rank: int

    def resume_dir(self) -> contextlib.AbstractContextManager[str | None]:
        """A local folder holding the checkpoint to resume from, or None for a fresh run."""

    def rows(self, split: str, *, batch_size: int, shuffle_buffer: int, shuffle_seed: int | None) -> Iterable[Batch]:
        """This rank's rows of ``split`` ("train", "validation") for one pass, as numpy column batches."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None, upload: Callable | None = None):
        """Hand metrics, and optionally a checkpoint folder, to the run (a barrier: every rank calls it)."""

    def wait_until_committed(self) -> None:
        """Return once the last reported checkpoint counts (a worker lost after this resumes from it)."""

    def show_progress(self, step: int, metrics: dict[str, float]) -> None:
        """Move the run's progress bar (rank 0; must not slow training)."""

    def set_outcome(self, key: str, value: Any) -> None:
        """Leave an outcome for the driver (the bad row that stopped the run, the skipped-rows report)."""


class RecipeHooks:
    """The one hook point for tests: fault injection and batch tracing
    (:mod:`pipelines.orchestration.hooks`).  Production runs use this base, which does nothing."""

    keeps_row_ids = False  # micro-batches carry their rows' (source, row) ids, for tracing

    def after_step(self, step: int, rank: int) -> None:
        """Called by every rank right after optimizer step ``step``."""

    def batches(self, batches: Iterable[Batch], epoch: int, rank: int) -> Iterable[Batch]:
        """The training micro-batches of ``epoch`` as this rank takes them."""
        return batches

    def checkpoint_upload(self, step: int, rank: int) -> Callable | None:
        """A replacement for the runtime's upload of this rank's part of step ``step``'s checkpoint."""
        return None


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local shuffle's seed: ``seed + epoch``, made distinct per rank, so ranks whose shares
    hold the same rows (a mixture weight above 1 copies a source) do not take them in the same order."""
    return (seed + epoch) * 1_000_003 + rank


def data_error_dict(exc: DataError) -> dict[str, Any]:
    return {"source": exc.source, "row": exc.row, "line": exc.line, "reason": exc.reason, "kind": exc.kind}


class TrainingRecipe:
    """Full or LoRA fine-tuning with any method, on one rank of a data-parallel DeepSpeed group."""

    def __init__(self, spec: RecipeSpec, runtime: WorkerRuntime, hooks: RecipeHooks | None = None):
        self.spec, self.cfg, self.runtime = spec, spec.config, runtime
        self.hooks = hooks or RecipeHooks()
        self.rank, self.world_size = runtime.rank, runtime.world_size
        self.skipped = BadRowReport()  # bad rows skipped by every rank, merged at each epoch's end
        self._epoch_batches: dict[int, MicroBatches] = {}
        self._validation: list[Batch] = []

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Model, reference, objective and engine; resume from the runtime's checkpoint; the data
        order; rank 0's MLflow logger; and, for DPO with precomputed references, the reference table."""
        cfg, use_gpu = self.cfg, self.spec.use_gpu and torch.cuda.is_available()
        return_freed_memory(cfg.scaling.worker_mmap_threshold_bytes)  # before the first large allocation
        self.device = torch.device(f"cuda:{self.runtime.local_rank}") if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        torch.manual_seed(cfg.optimization.seed)

        model, self.tokenizer = build_model_and_tokenizer(cfg, use_gpu)  # under ZeRO-3 built into partitions
        self.attention, why = attention(cfg, use_gpu)
        if self.rank == 0:
            print(f"attention: {why}", flush=True)  # Ray shows a worker's output on the driver
        reference = partitioned_reference(cfg, self.tokenizer, use_gpu)
        self.objective = build_objective(
            cfg.method, model, self.device, seed=cfg.optimization.seed, rank=self.rank, reference=reference
        )
        self.engine = build_engine(cfg, model, self.spec.schedule.total_steps, use_gpu)
        self.state, resumed = self._load_checkpoint()
        self.state.check_resumable(self.world_size, self.spec.data_fingerprint)
        self.state.world_size, self.state.data_fingerprint = self.world_size, self.spec.data_fingerprint

        self.logger = None
        if self.rank == 0 and self.spec.mlflow_run_id and self.spec.tracking_uri:
            self.logger = RunLogger(self.spec.tracking_uri, self.spec.mlflow_run_id)
            if resumed:  # makes a resume visible in the run: the step training continued from
                self.logger.metrics({"resumed_from_step": self.state.step}, step=self.state.step)
            else:
                trainable, total = parameter_counts(self.engine.module)
                self.logger.params(
                    {
                        "model.trainable_parameters": trainable,
                        "model.total_parameters": total,
                        "model.attention": self.attention,
                    }
                )

        self.reference_table = None
        if cfg.method.precomputed_reference:  # each rank scores its own share once; the table is then gathered
            pairs = self._micro_batches("train", shuffle_seed=None, keep_ids=True, drop_last=False)
            self.reference_table = precompute_reference_table(self.objective, pairs, self.device, self.engine)

    def _load_checkpoint(self) -> tuple[LoopState, bool]:
        with self.runtime.resume_dir() as ckpt_dir:
            if ckpt_dir is None:
                return LoopState(), False
            self.engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_lr_scheduler_states=True)
            return LoopState.load(ckpt_dir), True

    # ------------------------------------------------------------------ data

    def _micro_batches(
        self, split: str, *, shuffle_seed: int | None, packing: Packing | None = None, **kwargs: Any
    ) -> MicroBatches:
        cfg = self.cfg
        micro = cfg.optimization.micro_batch_size
        shuffle = cfg.data.shuffle_buffer_size if shuffle_seed is not None else 0
        rows = self.runtime.rows(
            split,
            batch_size=micro if packing is None else min(packing.window, 256),
            shuffle_buffer=shuffle,
            shuffle_seed=shuffle_seed if shuffle else None,
        )
        return MicroBatches(
            rows, token_keys=token_keys(data_mode(cfg)), micro_batch_size=micro,
            pad_token_id=self.tokenizer.pad_token_id, on_bad_row=cfg.data.on_bad_row, packing=packing, **kwargs,
        )  # fmt: skip

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        """This rank's training micro-batches of ``epoch`` (packed when the config packs; validation
        and the reference table stay padded, so val_nll compares across runs)."""
        self._epoch_batches[epoch] = self._micro_batches(
            "train",
            shuffle_seed=shuffle_seed(self.cfg.optimization.seed, epoch, self.rank),
            keep_ids=self.cfg.method.precomputed_reference or self.hooks.keeps_row_ids,
            packing=packing_of(self.cfg),
        )
        return self.hooks.batches(self._epoch_batches[epoch], epoch, self.rank)

    def validation_batches(self) -> list[Batch]:
        """Read and tokenized once per worker (it is small); each rank keeps its own share."""
        if not self._validation:
            self._validation.extend(self._micro_batches("validation", shuffle_seed=None))
        return self._validation

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        """The epoch/step loop (:func:`pipelines.training.loop.run_training`) with this recipe's step
        and epoch-end steps.  A bad row that stops training is left for the driver as an outcome: a
        clean exit, not a crash, since a retried worker group would only meet the same row again."""
        try:
            run_training(
                self.cfg,
                engine=self.engine,
                objective=self.objective,
                schedule=self.spec.schedule,
                state=self.state,
                batches_for_epoch=self.train_batches,
                validation_batches=self.validation_batches if self.spec.has_validation else None,
                device=self.device,
                on_step=self.on_step,
                reference_table=self.reference_table,
                on_epoch_end=self.on_epoch_end,
            )
        except StreamDataError as exc:  # every rank gets here together (the loop agreed on it)
            if self.rank == 0:
                self.runtime.set_outcome("data_error", data_error_dict(exc))
            self.flush_metrics()
            return
        self.flush_metrics()  # the last epoch's figures are logged after the final checkpoint
        if self.rank == 0:  # the skip totals include the last epoch, which ends after the last report
            self.runtime.set_outcome("data_report", self.skipped.to_dict())

    def flush_metrics(self) -> None:
        """Rank 0's metrics are logged asynchronously: wait until MLflow has every one logged so far."""
        if self.logger is not None:
            self.logger.flush()

    def on_step(self, state: LoopState, metrics: dict[str, float], is_last: bool) -> None:
        """After each optimizer step, on every rank: the test hook, progress, logging, then a
        checkpoint or a report."""
        self.hooks.after_step(state.step, self.rank)
        metrics = {**metrics, "step": state.step}
        if self.rank == 0:
            self.runtime.show_progress(state.step, metrics)
        if self.logger is not None and len(metrics) > 1:
            self.logger.metrics({k: v for k, v in metrics.items() if k != "step"}, step=state.step)
        if self.checkpoint_due(state.step, is_last):
            self.save_checkpoint(state, metrics, final=is_last)
        elif self.report_due(metrics):
            self.runtime.report(metrics)

    def checkpoint_due(self, step: int, is_last: bool) -> bool:
        return step % self.cfg.checkpointing.every_n_steps == 0 or is_last

    def report_due(self, metrics: dict[str, float]) -> bool:
        """Only checkpoints and evaluations are reported (what the run's result and a sweep's scheduler
        read): in Ray Train each report waits for the controller's next poll (2 s), so reporting every
        step would cap a run at one step per 2 s.  MLflow gets every logged step from rank 0.  The
        condition is the same on every rank (a report is a barrier)."""
        return "val_nll" in metrics or (self.spec.report_each_log_step and len(metrics) > 1)

    def on_epoch_end(self, epoch: int, dropped: int) -> None:
        """Gather every rank's data figures of ``epoch`` (a collective) and log them from rank 0."""
        stats = {**self._epoch_batches.pop(epoch).stats.to_dict(), "dropped": dropped}
        gathered = [stats] * self.world_size
        if self.world_size > 1:
            dist.all_gather_object(gathered, stats)
        for d in gathered:
            self.skipped.merge(BadRowReport.from_dict(d["skipped"]))
        if self.logger is None:
            return
        positions = sum(d["positions"] for d in gathered)
        figures = {f"data/rows_read_rank{r}": d["rows_read"] for r, d in enumerate(gathered)}
        figures["data/padding_fraction"] = 1.0 - sum(d["tokens"] for d in gathered) / positions if positions else 0
        figures["data/bad_rows_skipped"] = self.skipped.skipped
        figures["data/examples_not_trained"] = sum(d["dropped"] for d in gathered)
        figures["epoch_end"] = epoch + 1
        self.logger.metrics(figures, step=self.state.step)
        self.logger.dict(self.skipped.to_dict(), "bad_rows_skipped.json")

    # ------------------------------------------------------------------ save_checkpoint

    def save_checkpoint(self, state: LoopState, metrics: dict[str, float], *, final: bool) -> None:
        """Every rank's DeepSpeed state, rank 0's loop state and, at the end, the Hugging Face model
        (and LoRA adapters), reported to the runtime as one checkpoint.  An intermediate checkpoint
        counts only once the runtime has committed it, so the recipe waits for that."""
        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=DS_TAG)
            if self.rank == 0:
                state.save(tmp)
            if final:
                export_hf_model(
                    self.engine.module, self.tokenizer, os.path.join(tmp, HF_MODEL_DIR), self.rank,
                    os.path.join(tmp, ADAPTER_DIR),
                )  # fmt: skip
            upload = self.hooks.checkpoint_upload(state.step, self.rank)
            self.flush_metrics()  # every step up to a committed checkpoint is in MLflow
            self.runtime.report(metrics, checkpoint_dir=tmp, upload=upload)
        if not final:
            self.runtime.wait_until_committed()

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> None:
        """Let go of the engine, the model and the cached batches (a sweep's next trial may start in
        this process's place).  Metrics still queued after a failure are not waited for: the run failed."""
        self._validation.clear()
        self._epoch_batches.clear()
        self.reference_table = None
        for name in ("engine", "objective"):
            if hasattr(self, name):
                delattr(self, name)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
