"""``ift train --dry-run``: validate the config, count the data and the steps, estimate the memory per
GPU; start no Ray cluster and train nothing."""

from __future__ import annotations

from typing import Any

import torch

from ift.data import DataError
from pipelines.config import TrainConfig
from pipelines.data.streaming import estimate_rows_per_micro, plan_data
from pipelines.training.estimate import MemoryEstimate, estimate_memory, model_shape, render
from pipelines.training.state import Schedule


def dry_run(cfg: TrainConfig, *, use_gpu: bool | None = None, log: Any = print) -> MemoryEstimate:
    """Validate, count the data and the steps, estimate the memory; start nothing."""
    if use_gpu is None:
        use_gpu = bool(cfg.scaling.use_gpu)
        if cfg.scaling.use_gpu == "auto":
            use_gpu = torch.cuda.is_available() and cfg.scaling.gpus_per_worker > 0
            if not use_gpu:
                log("scaling.use_gpu=auto and no GPU here: sized as a CPU run (scaling.use_gpu=true sizes GPUs)")
    o = cfg.optimization
    unit = "packed rows" if cfg.data.packing else "sequences"
    log(
        f"global batch {cfg.global_batch} {unit} = micro {o.micro_batch_size} x accumulation "
        f"{cfg.accumulation_steps} x {cfg.scaling.num_workers} workers"
    )
    try:
        plan = plan_data(cfg)
        rows_per_micro = None
        if cfg.data.packing:
            rows_per_micro = estimate_rows_per_micro(cfg, plan.train, from_cache=plan.from_cache)
        schedule = Schedule.from_config(cfg, plan.train.rows, cfg.scaling.num_workers, rows_per_micro)
        log(
            f"data: {plan.train.rows:,} training rows -> {schedule.steps_per_epoch:,} steps per epoch, "
            f"{schedule.total_steps:,} in all"
        )
    except DataError as exc:  # the memory estimate does not need the data
        log(f"data: not counted ({exc})")
    try:
        shape = model_shape(cfg)
    except OSError as exc:
        raise ValueError(
            f"cannot read the configuration of model.name={cfg.model.name!r} ({exc}); the estimate needs its "
            "config.json (a hub id with hub access, or a local directory)"
        ) from None
    est = estimate_memory(cfg, shape, use_gpu=use_gpu)
    log(render(cfg, est, use_gpu=use_gpu))
    return est
