"""``ift train --dry-run``: validate the config, count the data and the steps, check a sample of the
rows, estimate the memory per GPU; start no Ray cluster and train nothing.

What would stop training stops the dry run too, with one line (a ``ValueError``; ``ift train
--dry-run`` exits 1): sources that are missing or unreadable, sampled rows of the wrong shape for
the method, an attention kernel that cannot load, a model that cannot be found, fewer rows than one
optimizer step.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from ift.data import DataError, normalize_row, parse_json_row
from ift.models import check_attention
from pipelines.config import TrainConfig
from pipelines.data.batching import data_mode
from pipelines.data.plan import SplitPlan, local_scanner
from pipelines.data.sources import read_shard
from pipelines.data.streaming import estimate_rows_per_micro, plan_data
from pipelines.data.tokenize import TokenizeRows, tokenize_rows_args
from pipelines.orchestration.storage import latest_checkpoint, read_run_record, resolve_storage_path
from pipelines.training.build import attention
from pipelines.training.estimate import MemoryEstimate, estimate_memory, model_shape, render
from pipelines.training.state import Schedule, check_training_settings

SAMPLE_ROWS = 64  # per training source: its first rows, through what training does to them


def dry_run(
    cfg: TrainConfig, *, use_gpu: bool | None = None, log: Any = print, resume_with_changes: bool = False
) -> MemoryEstimate:
    """Validate, count the data and the steps, check a sample of rows, estimate the memory; start nothing.
    Raises ``ValueError`` (a :class:`DataError` for the data) on what would stop training, and
    :class:`ResumeError` for a re-run that ``ift train`` would refuse."""
    for note in cfg.notes:
        log(f"note: {note}")
    log(_resume_plan(cfg, resume_with_changes))
    if use_gpu is None:
        use_gpu = bool(cfg.scaling.use_gpu)
        if cfg.scaling.use_gpu == "auto":
            use_gpu = torch.cuda.is_available() and cfg.scaling.gpus_per_worker > 0
            if not use_gpu:
                log("scaling.use_gpu=auto and no GPU here: sized as a CPU run (scaling.use_gpu=true sizes GPUs)")
    _check_attention(cfg, use_gpu)
    log(f"attention: {_attention_plan(cfg, use_gpu)}")
    o = cfg.optimization
    unit = "packed rows" if cfg.data.packing else "sequences"
    log(
        f"global batch {cfg.global_batch} {unit} = micro {o.micro_batch_size} x accumulation "
        f"{cfg.accumulation_steps} x {cfg.scaling.num_workers} workers"
    )
    try:
        shape = model_shape(cfg)
    except OSError as exc:
        raise ValueError(
            f"cannot read the configuration of model.name={cfg.model.name!r} ({exc}); the estimate needs its "
            "config.json (a hub id with hub access, or a local directory)"
        ) from None
    est = estimate_memory(cfg, shape, use_gpu=use_gpu)
    log(render(cfg, est, use_gpu=use_gpu))
    # The data last: the estimate above stands even where the data cannot be read (a laptop without
    # access to the cluster's buckets or the hub), and the run fails here as training would.
    # A missing or unreadable source is a DataError naming it; the scan index is read, not written.
    plan = plan_data(cfg, local_scanner(cfg, writable=False))
    if not plan.from_cache:
        log(check_sample(cfg, plan.train))
    rows_per_micro = None
    if cfg.data.packing:
        rows_per_micro = estimate_rows_per_micro(cfg, plan.train, from_cache=plan.from_cache)
    schedule = Schedule.from_config(cfg, plan.train.rows, cfg.scaling.num_workers, rows_per_micro)
    log(
        f"data: {plan.train.rows:,} training rows -> {schedule.steps_per_epoch:,} steps per epoch, "
        f"{schedule.total_steps:,} in all"
    )
    return est


def _resume_plan(cfg: TrainConfig, resume_with_changes: bool) -> str:
    """Whether the run would start, resume or be refused (read only: the run's record is not written)."""
    storage = resolve_storage_path(cfg.checkpointing.storage_path)
    previous = latest_checkpoint(storage, cfg.run_name)
    if previous is None:
        return f"run '{cfg.run_name}': a new run in {storage}"
    record = read_run_record(storage, cfg.run_name)
    changes = {}
    if record is not None:
        changes = check_training_settings(
            previous[1].step, record["training_settings"], cfg.training_settings(),
            resume_with_changes=resume_with_changes,
        )  # fmt: skip
    how = f" with changed {', '.join(changes)}" if changes else ""
    return f"run '{cfg.run_name}': resumes from its checkpoint at step {previous[1].step}{how}"


def _attention_plan(cfg: TrainConfig, use_gpu: bool) -> str:
    if use_gpu and cfg.model.attn_implementation == "auto" and not torch.cuda.is_available():
        return (
            "model.attn_implementation=auto: chosen on the GPU workers (flash_attention_2 where the flash-attn "
            "package is installed, else sdpa); the run says which at start"
        )
    return attention(cfg, use_gpu)[1]


def _check_attention(cfg: TrainConfig, use_gpu: bool) -> None:
    if cfg.model.attn_implementation != "flash_attention_2":
        return
    if not use_gpu:
        raise ValueError(
            "model.attn_implementation=flash_attention_2 needs CUDA GPUs, and this run is sized for CPU "
            f"(scaling.use_gpu={cfg.scaling.use_gpu}); use sdpa, or scaling.use_gpu=true to size a GPU run"
        )
    if torch.cuda.is_available():  # a GPU machine: the workers' own check, here
        check_attention(cfg.model.attn_implementation)


def check_sample(cfg: TrainConfig, plan: SplitPlan) -> str:
    """The first :data:`SAMPLE_ROWS` rows of each training source through what training does to them
    (parsing, the format check for the method, tokenization with the run's tokenizer when it loads
    here).  A bad row is a :class:`DataError` under ``on_bad_row=error``; under ``skip`` only a sample
    with no good row is.  Returns what was checked, in words."""
    mode = data_mode(cfg)
    try:
        tokenize_rows = TokenizeRows(*tokenize_rows_args(cfg))
        how = "parsed and tokenized"
    except OSError:  # a hub tokenizer without hub access: the rows' shape can still be checked
        tokenize_rows, how = None, "parsed (the tokenizer does not load here, so not tokenized)"
    first_shards = {shard.path: shard for shard in reversed(plan.shards)}  # each source's first shard
    checked = bad = 0
    for shard in first_shards.values():
        for raw in itertools.islice(read_shard(shard.to_item()), SAMPLE_ROWS):
            checked += 1
            error = _row_error(raw, mode, tokenize_rows)
            if error is not None and cfg.data.on_bad_row == "error":
                raise error
            bad += error is not None
    if checked and bad == checked:
        raise DataError(plan.shards[0].path, None, f"all {checked} sampled rows are bad (data.on_bad_row=skip)")
    return f"data: {checked} sampled rows {how} for {cfg.method.name}" + (f", {bad} bad (skipped)" if bad else "")


def _row_error(raw: dict[str, Any], mode: str, tokenize_rows: TokenizeRows | None) -> DataError | None:
    source, row, line = raw["source"], raw["row"], raw["line"] or None
    if tokenize_rows is not None:
        out = tokenize_rows({k: [raw[k]] for k in ("source", "row", "line", "payload")})
        if not out["error"][0]:
            return None
        return DataError(source, row, out["error"][0], kind=out["error_kind"][0], line=line)
    try:
        conversation = normalize_row(parse_json_row(raw["payload"], source, row, line=line), source=source, index=row)
    except DataError as exc:  # named by row; a JSONL row is named by its line
        return DataError(source, row, exc.reason, kind=exc.kind, line=line)
    if mode == "preference" and conversation.rejected_messages is None:
        return DataError(
            source, row, f"the method trains on pairs and the row is in {conversation.format!r} format "
            "(it needs 'chosen' and 'rejected')", kind="missing_field", line=line,
        )  # fmt: skip
    return None
