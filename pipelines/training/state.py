"""Where a run is and what its checkpoints hold: the loop state saved with every checkpoint, the step
schedule derived from the data, and the checkpoint folder's layout.  No Ray, no DeepSpeed."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.config import TrainConfig

STATE_FILE = "trainer_state.json"
DS_TAG = "deepspeed"
HF_MODEL_DIR = "hf_model"
ADAPTER_DIR = "lora_adapter"  # beside hf_model/ in the final checkpoint, for LoRA runs
RUN_RECORD = "ift_run.json"  # in the run's folder: the training settings it was started with

# Settings a checkpoint cannot be continued under even when asked: its weights, adapters or
# DeepSpeed partitions have another shape.
FIXED_SETTINGS = ("model.name", "model.revision", "model.lora", "deepspeed.zero_stage")


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed as the run is now configured."""


@dataclass
class LoopState:
    """Where training is; saved with every checkpoint so a resume continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed (the same on every rank)
    tokens_seen: int = 0
    # What the data position means: a resume with another world size or other data is refused.
    world_size: int = 0
    data_fingerprint: str = ""

    def check_resumable(self, world_size: int, data_fingerprint: str) -> None:
        """Refuse to resume a checkpoint whose data position means something else now."""
        if self.world_size and self.world_size != world_size:
            raise ResumeError(
                f"the checkpoint at step {self.step} was written by {self.world_size} workers and this run has "
                f"{world_size}: each rank's data position would point at other rows.  Resume with "
                f"scaling.num_workers={self.world_size}, or start a new run (another run_name)."
            )
        if self.data_fingerprint and self.data_fingerprint != data_fingerprint:
            raise ResumeError(
                f"the checkpoint at step {self.step} was written for training data {self.data_fingerprint} and the "
                f"data is now {data_fingerprint} (files, mixture, tokenizer, max_length, seed or packing changed).  "
                "Resume with the same data, or start a new run (another run_name)."
            )

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)  # atomic: a reader sees the old or the new state, never half

    @classmethod
    def from_json(cls, text: str | bytes) -> LoopState:
        return cls(**json.loads(text))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> LoopState:
        return cls.from_json((Path(directory) / STATE_FILE).read_text())


def _show(value: object) -> str:
    return "<unset>" if value is _MISSING else repr(value)


_MISSING = object()


def settings_changes(recorded: dict, current: dict) -> dict[str, tuple[object, object]]:
    """``key -> (recorded, current)`` for every training setting that differs."""
    keys = sorted(set(recorded) | set(current))
    return {
        k: (recorded.get(k, _MISSING), current.get(k, _MISSING))
        for k in keys
        if recorded.get(k, _MISSING) != current.get(k, _MISSING)
    }


def check_training_settings(step: int, recorded: dict, current: dict, *, resume_with_changes: bool) -> dict[str, list]:
    """Refuse to resume a run (its checkpoint at ``step``) under training settings other than the
    ones it was started with, unless ``resume_with_changes``; never under another model, adapter
    shape or ZeRO stage.  Returns the changes continued under, as ``key -> [old, new]`` (JSON-able)."""
    changes = settings_changes(recorded, current)
    if not changes:
        return {}
    lines = [f"  {k}: {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items()]
    fixed = [k for k in changes if k.startswith(FIXED_SETTINGS)]
    if fixed:
        raise ResumeError(
            f"its checkpoint at step {step} was trained under other settings; changed:\n"
            + "\n".join(lines)
            + f"\n{', '.join(fixed)} cannot change within a run (the "
            "checkpoint's weights or partitions would not fit).  Start a new run: set another run_name, or leave "
            "run_name unset (the name then follows the training settings)."
        )
    if not resume_with_changes:
        raise ResumeError(
            f"its checkpoint at step {step} was trained under other settings; changed:\n"
            + "\n".join(lines)
            + "\nEither start a new run (set another run_name, or leave "
            "run_name unset: the name then follows the training settings), or continue this one from step "
            f"{step} with the new settings: ift train ... --resume-with-changes"
        )
    return {
        k: [None if old is _MISSING else old, None if new is _MISSING else new] for k, (old, new) in changes.items()
    }


def data_position_fingerprint(cfg: TrainConfig, train_fingerprint: str) -> str:
    """What a saved data position (``micro_in_epoch``) counts in: the training data, and with packing
    the pack geometry too (the same rows make other micro-batches under another one)."""
    if not cfg.data.packing:
        return train_fingerprint
    d = cfg.data
    length = d.resolved_pack_length(cfg.method.paired)
    return f"{train_fingerprint}/packed-{length}-{d.packing_strategy}-{d.packing_window}"


@dataclass
class Schedule:
    """Step counts derived from the data size and the batch geometry."""

    micro_per_epoch: int  # micro-batches per worker per epoch
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def from_config(
        cls, cfg: TrainConfig, train_rows: int, world_size: int, rows_per_micro: float | None = None
    ) -> Schedule:
        """Micro-batches per rank per epoch = rows ÷ (rows per micro-batch × workers), down to whole steps.

        ``rows_per_micro`` is ``micro_batch_size`` for padded batches; with packing it is the
        estimated examples per pack (:func:`pipelines.data.streaming.estimate_rows_per_micro`), so the count is
        an estimate and the loop also ends an epoch when the first rank's stream runs out.
        """
        o = cfg.optimization
        per_micro = float(rows_per_micro if rows_per_micro is not None else o.micro_batch_size)
        micro = int(train_rows // (per_micro * world_size)) // cfg.accumulation_steps
        micro *= cfg.accumulation_steps
        steps = micro // cfg.accumulation_steps
        if steps == 0:
            batch = (
                f"{o.micro_batch_size} packed rows of {cfg.data.resolved_pack_length(cfg.method.paired)} tokens "
                "holding "
                f"{per_micro:.1f} examples on average"
                if cfg.data.packing
                else f"micro_batch_size {o.micro_batch_size}"
            )
            raise ValueError(
                f"{train_rows} training rows are fewer than one optimizer step needs "
                f"({batch} x workers {world_size} x accumulation {cfg.accumulation_steps}); "
                "add data or shrink the batch"
            )
        total = steps * o.epochs
        if o.max_steps is not None:
            total = min(total, o.max_steps)
        return cls(micro_per_epoch=micro, steps_per_epoch=steps, total_steps=total)
