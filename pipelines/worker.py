"""The Ray Train worker: plain PyTorch + DeepSpeed around ``pipelines.loop.run_training``.

Data: each rank iterates its own share of the streamed corpus (Ray Train's
``streaming_split``: equal rows per rank, decided in a deterministic order), with
the per-epoch local shuffle seeded ``seed + epoch``.  :class:`pipelines.batching.MicroBatches`
turns the rows into micro-batches and applies the bad-row policy; the loop keeps
the ranks in step.  A resume re-reads the epoch's stream and skips the micro-batches
already trained (refused when the world size or the data changed).  At each epoch's
end the ranks' data figures are gathered and rank 0 logs them to MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray.data
import ray.train
import torch
import torch.distributed as dist
from mlflow.entities import Metric, Param

from ift.data import BadRowReport, DataError
from ift.lora import parameter_counts
from pipelines.batching import MicroBatches, Packing
from pipelines.build import build_engine, build_model_and_tokenizer, partitioned_reference
from pipelines.config import TrainConfig
from pipelines.data import data_mode, packing_of, token_keys
from pipelines.export import export_hf_model
from pipelines.loop import (
    ADAPTER_DIR,
    DS_TAG,
    HF_MODEL_DIR,
    STATE_FILE,
    LoopState,
    Schedule,
    StreamDataError,
    precompute_reference_table,
    run_training,
)
from pipelines.methods import build_objective


@dataclass(frozen=True)
class KillWorker:
    """A test hook: kill the worker of ``rank`` (``os._exit``) right after optimizer step ``step``,
    or, ``while_saving``, in the middle of uploading its part of that step's checkpoint.

    Passed explicitly as ``train(cfg, fault=KillWorker(...))``; production runs never
    carry one.  The marker file makes it fire once, so the restarted group runs on.
    """

    step: int
    rank: int
    marker: str
    while_saving: bool = False

    def _fires(self, step: int, rank: int) -> bool:
        return step == self.step and rank == self.rank and not os.path.exists(self.marker)

    def __call__(self, step: int, rank: int) -> None:
        if not self.while_saving and self._fires(step, rank):
            open(self.marker, "w").close()
            os._exit(1)

    def checkpoint_upload_fn(self, step: int, rank: int) -> Callable[[ray.train.Checkpoint, str], Any] | None:
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
class StallWorker:
    """A test hook: the worker of ``rank`` writes its Ray node id to ``marker`` right after optimizer
    step ``step`` and stalls, as a worker on a failing machine does, until the test takes its node away."""

    step: int
    rank: int
    marker: str

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank and not os.path.exists(self.marker):
            with open(self.marker + ".tmp", "w") as f:
                f.write(ray.get_runtime_context().get_node_id())
            os.replace(self.marker + ".tmp", self.marker)
            time.sleep(3600)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (runs on every worker)."""
    import mlflow

    cfg = TrainConfig.model_validate(loop_config["config"])
    # Ray Data's per-iteration bars would interleave with the driver's progress bar.
    ray.data.DataContext.get_current().enable_progress_bars = False
    schedule = Schedule(**loop_config["schedule"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available() and loop_config["use_gpu"]
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.optimization.seed)

    model, tokenizer = build_model_and_tokenizer(cfg, use_gpu)  # under ZeRO-3 built into partitions
    reference = partitioned_reference(cfg, tokenizer, use_gpu)
    objective = build_objective(cfg.method, model, device, seed=cfg.optimization.seed, rank=rank, reference=reference)
    engine = build_engine(cfg, model, schedule.total_steps, use_gpu)

    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_lr_scheduler_states=True)
            state = LoopState.load(ckpt_dir)

    state.check_resumable(world, loop_config["data_fingerprint"])
    state.world_size, state.data_fingerprint = world, loop_config["data_fingerprint"]

    precompute = cfg.method.name == "dpo" and cfg.method.precompute_reference
    micro = cfg.optimization.micro_batch_size
    keys = token_keys(data_mode(cfg))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if loop_config["has_validation"] else None
    epoch_batches: dict[int, MicroBatches] = {}

    def micro_batches(shard, *, shuffle_seed: int | None, packing: Packing | None = None, **kwargs: Any):
        shuffle = cfg.data.shuffle_buffer_size if shuffle_seed is not None else 0
        rows = shard.iter_batches(
            batch_size=micro if packing is None else min(packing.window, 256), batch_format="numpy",
            local_shuffle_buffer_size=shuffle or None, local_shuffle_seed=shuffle_seed if shuffle else None,
        )  # fmt: skip
        return MicroBatches(
            rows, token_keys=keys, micro_batch_size=micro, pad_token_id=tokenizer.pad_token_id,
            on_bad_row=cfg.data.on_bad_row, packing=packing, **kwargs,
        )  # fmt: skip

    trace_dir = loop_config.get("trace_dir")
    report_each_log_step = loop_config.get("report_each_log_step", False)

    def batches_for_epoch(epoch: int):
        epoch_batches[epoch] = micro_batches(
            train_shard,
            shuffle_seed=shuffle_seed(cfg.optimization.seed, epoch, rank),
            keep_ids=precompute or bool(trace_dir),
            packing=packing_of(cfg),  # validation and the reference table stay padded: val_nll compares across runs
        )
        return epoch_batches[epoch] if not trace_dir else traced(epoch_batches[epoch], epoch, rank, trace_dir)

    validation_cache: list[dict[str, Any]] = []

    def validation_batches() -> list[dict[str, Any]]:
        # Read and tokenized once per worker (it is small); each rank keeps its own share.
        if not validation_cache:
            validation_cache.extend(micro_batches(val_shard, shuffle_seed=None))
        return validation_cache

    reference_table = None
    if precompute:  # each rank scores its own share once; the table is then gathered
        reference_table = precompute_reference_table(
            objective, micro_batches(train_shard, shuffle_seed=None, keep_ids=True, drop_last=False), device
        )

    fault: KillWorker | StallWorker | None = loop_config.get("fault")
    monitor = loop_config["progress"]
    progress = monitor if rank == 0 else None
    client = run_id = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        client = mlflow.MlflowClient(tracking_uri=loop_config["tracking_uri"])
        run_id = loop_config["mlflow_run_id"]

    if client is not None and checkpoint is None:
        trainable, total = parameter_counts(engine.module)
        client.log_batch(run_id, params=[Param("model.trainable_parameters", str(trainable)),
                                         Param("model.total_parameters", str(total))])  # fmt: skip
    if client is not None and checkpoint is not None:
        # Makes a resume visible in the run: the step training continued from.
        client.log_metric(run_id, "resumed_from_step", state.step, step=state.step)

    def on_step(st: LoopState, metrics: dict[str, float], is_last: bool) -> None:
        if fault is not None:
            fault(st.step, rank)
        metrics = {**metrics, "step": st.step}
        if progress is not None:
            progress.update.remote(st.step, metrics)  # fire and forget: the bar must not slow training
        if client is not None and len(metrics) > 1:
            now = int(time.time() * 1000)
            client.log_batch(
                run_id, metrics=[Metric(k, float(v), now, st.step) for k, v in metrics.items() if k != "step"]
            )
        # Ray Train takes one report per controller poll (every 2 s in Ray 2.60; a queue of one), and a
        # report waits for the previous one to be taken: reporting every step would cap a run at one
        # step per 2 s.  So report only checkpoints and evaluations (what Ray Train's result and a
        # sweep's scheduler read); MLflow gets every logged step from rank 0 above.  The conditions
        # are the same on every rank (a report is a barrier).
        if st.step % cfg.checkpointing.every_n_steps == 0 or is_last:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag=DS_TAG)
                if rank == 0:
                    st.save(tmp)
                if is_last:
                    export_hf_model(
                        engine.module, tokenizer, os.path.join(tmp, HF_MODEL_DIR), rank, os.path.join(tmp, ADAPTER_DIR)
                    )
                upload = getattr(fault, "checkpoint_upload_fn", lambda step, rank: None)(st.step, rank)
                ray.train.report(
                    metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_upload_fn=upload
                )
            if not is_last:
                # The checkpoint counts once the controller has taken its report (its next poll).  An
                # empty report waits for that, so a worker lost after this step resumes from here.
                ray.train.report({})
        elif "val_nll" in metrics or (report_each_log_step and len(metrics) > 1):
            ray.train.report(metrics)

    skipped = BadRowReport()

    def on_epoch_end(epoch: int, dropped: int) -> None:
        stats = {**epoch_batches.pop(epoch).stats.to_dict(), "dropped": dropped}
        gathered = [stats] * world
        if world > 1:
            dist.all_gather_object(gathered, stats)
        for d in gathered:
            skipped.merge(BadRowReport.from_dict(d["skipped"]))
        if client is None:
            return
        positions = sum(d["positions"] for d in gathered)
        data_metrics = {f"data/rows_read_rank{r}": d["rows_read"] for r, d in enumerate(gathered)}
        data_metrics["data/padding_fraction"] = 1.0 - sum(d["tokens"] for d in gathered) / positions if positions else 0
        data_metrics["data/bad_rows_skipped"] = skipped.skipped
        data_metrics["data/examples_not_trained"] = sum(d["dropped"] for d in gathered)
        data_metrics["epoch_end"] = epoch + 1
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, state.step) for k, v in data_metrics.items()])
        client.log_dict(run_id, skipped.to_dict(), "bad_rows_skipped.json")

    try:
        run_training(
            cfg,
            engine=engine,
            objective=objective,
            schedule=schedule,
            state=state,
            batches_for_epoch=batches_for_epoch,
            validation_batches=validation_batches if val_shard is not None else None,
            device=device,
            on_step=on_step,
            reference_table=reference_table,
            on_epoch_end=on_epoch_end,
        )
    except StreamDataError as exc:
        # Every rank gets here together (the loop agreed on it).  A clean exit, not a crash: a
        # retried worker group would only meet the same row again.  The driver reads the row
        # from its monitor actor (Ray Train hands back only checkpointed metrics).
        if rank == 0:
            ray.get(monitor.set_outcome.remote("data_error", data_error_dict(exc)))
        return
    if rank == 0:  # the skip totals include the last epoch, which ends after the last report
        ray.get(monitor.set_outcome.remote("data_report", skipped.to_dict()))


def data_error_dict(exc: DataError) -> dict[str, Any]:
    return {"source": exc.source, "row": exc.row, "line": exc.line, "reason": exc.reason, "kind": exc.kind}


def traced(batches, epoch: int, rank: int, trace_dir: str):
    """A test hook: append each micro-batch's row ids, as (epoch, index in epoch, [[source, row], ...]),
    to ``trace_dir/rank<r>.jsonl`` as the rank takes it (a re-read after a resume appears again)."""
    path = os.path.join(trace_dir, f"rank{rank}.jsonl")
    for i, batch in enumerate(batches):
        ids = [[os.path.basename(s), int(r)] for s, r in zip(batch["source"], batch["row"].tolist(), strict=True)]
        with open(path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "micro": i, "rows": ids}) + "\n")
        yield batch


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local shuffle's seed: ``seed + epoch``, made distinct per rank, so ranks whose shares
    hold the same rows (a mixture weight above 1 copies a source) do not take them in the same order."""
    return (seed + epoch) * 1_000_003 + rank
