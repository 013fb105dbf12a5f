"""The Ray Train worker: plain PyTorch + DeepSpeed around ``pipelines.loop.run_training``.

Data: every worker reads the same materialized, globally shuffled stream
(``DataConfig(datasets_to_split=[])``) with the same per-epoch local-shuffle
seed, cuts it into global batches of ``micro_batch_size × world_size`` rows and
keeps its own slice, as ``DistributedSampler`` does.  That makes the order
deterministic, so (a) a resume skips exactly the micro-batches already seen,
(b) every rank runs the same number of steps (no collective hangs on uneven
shards) and (c) 2 workers × micro-batch B see the same rows per step as 1 worker
with micro-batch B and 2 accumulation steps.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data
import ray.train
import torch

from ift.data import pad_collate
from pipelines.config import TrainConfig
from pipelines.loop import (
    DS_TAG,
    HF_MODEL_DIR,
    LoopState,
    Schedule,
    build_engine,
    build_model_and_tokenizer,
    export_hf_model,
    run_training,
)
from pipelines.methods import build_objective


class RankSliceCollate:
    """Global batch (numpy columns) -> this rank's padded tensors."""

    def __init__(self, rank: int, world: int, micro_batch: int, pad_token_id: int, keep_ids: bool):
        self.start, self.stop = rank * micro_batch, (rank + 1) * micro_batch
        self.pad_token_id = pad_token_id
        self.keep_ids = keep_ids

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        token_keys = [k for k in batch if k.endswith(("input_ids", "labels"))]
        rows = [
            {k: batch[k][i].tolist() for k in token_keys}
            for i in range(self.start, min(self.stop, len(batch[token_keys[0]])))
        ]
        out: dict[str, Any] = pad_collate(rows, self.pad_token_id)
        if self.keep_ids:
            out["source"] = [str(s) for s in batch["source"][self.start : self.stop]]
            out["row"] = torch.as_tensor(np.asarray(batch["row"][self.start : self.stop], dtype=np.int64))
        return out


@dataclass(frozen=True)
class KillWorker:
    """A test hook: kill the worker of ``rank`` (``os._exit``) right after optimizer step ``step``.

    Passed explicitly as ``train(cfg, fault=KillWorker(...))``; production runs never
    carry one.  The marker file makes it fire once, so the restarted group runs on.
    """

    step: int
    rank: int
    marker: str

    def __call__(self, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)


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

    model, tokenizer = build_model_and_tokenizer(cfg)
    objective = build_objective(cfg.method, model, device, seed=cfg.optimization.seed, rank=rank)
    engine = build_engine(cfg, model, schedule.total_steps, use_gpu)

    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag=DS_TAG, load_lr_scheduler_states=True)
            state = LoopState.load(ckpt_dir)

    precompute = cfg.method.name == "dpo" and cfg.method.precompute_reference
    micro = cfg.optimization.micro_batch_size
    collate = RankSliceCollate(rank, world, micro, tokenizer.pad_token_id, keep_ids=precompute)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if loop_config["has_validation"] else None

    def batches_for_epoch(epoch: int):
        return train_shard.iter_torch_batches(
            batch_size=micro * world,
            drop_last=True,
            collate_fn=collate,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer_size or None,
            local_shuffle_seed=cfg.optimization.seed + epoch if cfg.data.shuffle_buffer_size else None,
        )

    def validation_batches():
        return val_shard.iter_torch_batches(batch_size=micro * world, drop_last=True, collate_fn=collate)

    reference_table = None
    if precompute:
        all_rows = RankSliceCollate(0, 1, micro * world, tokenizer.pad_token_id, keep_ids=True)
        reference_table = objective.precompute_reference(
            train_shard.iter_torch_batches(batch_size=micro * world, collate_fn=all_rows)
        )

    fault: KillWorker | None = loop_config.get("fault")
    progress = loop_config.get("progress") if rank == 0 else None
    client = run_id = None
    if rank == 0 and loop_config.get("mlflow_run_id"):
        client = mlflow.MlflowClient(tracking_uri=loop_config["tracking_uri"])
        run_id = loop_config["mlflow_run_id"]

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
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(
                run_id, metrics=[Metric(k, float(v), now, st.step) for k, v in metrics.items() if k != "step"]
            )
        # ray.train.report is a barrier with the controller (slow): report only when
        # there are metrics or a checkpoint; the step condition is the same on every rank.
        if st.step % cfg.checkpointing.every_n_steps == 0 or is_last:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag=DS_TAG)
                if rank == 0:
                    st.save(tmp)
                if is_last:
                    export_hf_model(engine, tokenizer, os.path.join(tmp, HF_MODEL_DIR), rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif len(metrics) > 1:
            ray.train.report(metrics)

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
    )
