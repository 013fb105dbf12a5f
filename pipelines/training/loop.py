"""The training loop shared by every method, by `ift train` and by every sweep trial.

Nothing here imports Ray: the recipe (:class:`pipelines.training.recipe.TrainingRecipe`) feeds
batches in and passes its step and epoch-end callbacks, which log, report and checkpoint.  The
ranks keep in step through small collectives (:func:`next_batch_on_every_rank`).  DeepSpeed runs
the step (ZeRO 0–3; :mod:`pipelines.training.build` hands it a torch optimizer object, because an
optimizer declared in the DeepSpeed config JIT-compiles a kernel).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from ift.data import DataError
from ift.forward import run_objective
from ift.objectives import ObjectiveOutput, sft_loss
from pipelines.config import TrainConfig
from pipelines.training.methods import Objective, ReferenceTable
from pipelines.training.state import LoopState, Schedule

# --------------------------------------------------------------------------- DPO's precomputed references


def attach_reference(batch: dict[str, Any], table: ReferenceTable, device) -> None:
    pairs = [table[key] for key in zip(batch["source"], batch["row"].tolist(), strict=True)]
    batch["reference_chosen_logps"] = torch.tensor([p[0] for p in pairs], device=device)
    batch["reference_rejected_logps"] = torch.tensor([p[1] for p in pairs], device=device)


# --------------------------------------------------------------------------- helpers


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each scalar over ranks, in one collective."""
    rank, world = _world()
    if world == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


def all_gather_int(value: int, device: torch.device) -> list[int]:
    """One integer from every rank, in rank order (exact: int64)."""
    world = _world()[1]
    if world == 1:
        return [value]
    t = torch.zeros(world, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(t, torch.tensor([value], dtype=torch.int64, device=device))
    return [int(v) for v in t.tolist()]


def batch_tokens(batch: dict[str, Any]) -> int:
    """Real (non-padding) tokens of a micro-batch's main sequences (``input_ids``, or the chosen ones)."""
    if "num_tokens" in batch:  # pipelines.data.batching counts them before collating (a packed batch has no mask)
        return int(batch["num_tokens"])
    prefix = "" if "input_ids" in batch else "chosen_"
    if f"{prefix}attention_mask" in batch:
        return int(batch[f"{prefix}attention_mask"].sum())
    return int(batch[f"{prefix}input_ids"].numel())  # packed, counted by nobody: one pack per row has no padding


def _drain(iterator: Iterator) -> int:
    """Read what is left of an epoch's stream, so the stream ends here and the next epoch starts
    clean (a streaming split starts its next epoch only once every reader has finished this one).
    Returns the examples read here, which train nothing: less than a micro-batch per rank when
    padded; with packing, what a rank holds beyond the first rank to run out.  A bad row there
    trains nothing, so it stops nothing."""
    dropped = 0
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return dropped
        except DataError:
            continue
        dropped += int(batch.get("num_examples", 0)) if isinstance(batch, dict) else 0


class StreamDataError(DataError):
    """A bad row stopped training; raised on every rank at once (the row is the first rank's that met one)."""


def _next(iterator: Iterator) -> tuple[int, dict[str, Any] | None, DataError | None]:
    """(status, batch, error): status 0 = a batch, 1 = the stream ended, 2 = a bad row."""
    try:
        return 0, next(iterator), None
    except StopIteration:
        return 1, None, None
    except DataError as exc:
        return 2, None, exc


def _agree(status: int, error: DataError | None, device: torch.device) -> tuple[bool, bool]:
    """(some rank's stream ended, some rank has a batch), agreed by every rank in one collective;
    a bad row on any rank raises :class:`StreamDataError` on all of them, with the lowest rank's row."""
    flags = torch.tensor([status == 2, status != 0, status == 0], dtype=torch.int64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    any_error, any_ended, any_batch = (bool(f) for f in flags.tolist())
    if any_error:
        errors = [error]
        if _world()[1] > 1:
            errors = [None] * _world()[1]
            dist.all_gather_object(errors, error)
        first = next(e for e in errors if e is not None)
        raise StreamDataError(first.source, first.row, first.reason, kind=first.kind, line=first.line)
    return any_ended, any_batch


def next_batch_on_every_rank(iterator: Iterator, device: torch.device) -> dict[str, Any] | None:
    """This rank's next micro-batch, or None when any rank's stream has ended.

    One small collective per micro-batch makes the ranks agree before anyone starts a
    forward pass that the others would not join.  A :class:`DataError` on any rank
    becomes a :class:`StreamDataError` on every rank, carrying the lowest rank's row.
    """
    status, batch, error = _next(iterator)
    any_ended, _ = _agree(status, error, device)
    return None if any_ended else batch


def until_every_rank_ends(iterator: Iterator, device: torch.device) -> Iterator[tuple[dict[str, Any], bool]]:
    """``(batch, real)`` for all of this rank's micro-batches, in step with the other ranks until the
    last stream ends: a rank whose stream ended first gets its last batch again with ``real=False``
    (its result is to be dropped), so every rank still joins each ZeRO-3 forward's gathers."""
    last = None
    while True:
        status, batch, error = _next(iterator)
        _, any_batch = _agree(status, error, device)
        if not any_batch:
            return
        if batch is not None:
            last = batch
            yield batch, True
        elif last is not None:
            yield last, False
        else:
            raise RuntimeError(
                f"rank {_world()[0]} has no micro-batch while other ranks do: its share of the data is smaller "
                "than one micro-batch; use fewer workers or a smaller optimization.micro_batch_size"
            )


def precompute_reference_table(
    objective: Objective, batches: Iterable[dict[str, Any]], device, engine=None
) -> ReferenceTable:
    """DPO's reference log-probs of every training pair: each rank scores the pairs of its own
    share once, in step with the others (:func:`until_every_rank_ends`), then the ranks' tables are
    gathered so each holds every pair, whichever rank reads it in a later epoch.  Frees the reference.
    ``engine``: the training engine, through which a LoRA model's adapters-off passes go."""
    table: ReferenceTable = {}
    for batch, real in until_every_rank_ends(iter(batches), device):
        rows = objective.reference_rows(to_device(batch, device), engine)
        if real:
            table.update(rows)
    if _world()[1] > 1:
        tables: list[ReferenceTable | None] = [None] * _world()[1]
        dist.all_gather_object(tables, table)
        table = {k: v for t in tables for k, v in t.items()}
    objective.release_reference()
    return table


def grad_norm(engine) -> float | None:
    """Global gradient norm of the step just taken (DeepSpeed keeps it for ZeRO ≥ 1)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


def _stage0_grad_norm(model: torch.nn.Module) -> float:
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum().cpu()
    return float(total.sqrt())


def _validation_pass(model: torch.nn.Module, *, method: Objective, batch: dict[str, Any], step: int) -> ObjectiveOutput:
    """The (chosen) responses' NLL as ``loss`` and, where the method can score unseen batches, its own
    loss as ``metrics["objective"]``: run through :func:`ift.forward.run_objective`, one engine forward."""
    prefix = method.response_prefix
    nll = sft_loss(
        model, batch[f"{prefix}input_ids"], batch.get(f"{prefix}attention_mask"), batch[f"{prefix}labels"],
        position_ids=batch.get(f"{prefix}position_ids"),
    ).loss  # fmt: skip
    metrics = {"objective": method.compute(model, batch, step, validation=True).loss} if method.can_validate else {}
    return ObjectiveOutput(nll, metrics)


@torch.no_grad()
def validation_metrics(
    engine, objective: Objective, batches: Iterable[dict[str, Any]], device, step: int
) -> dict[str, float]:
    """Validation NLL of the (chosen) responses, comparable across methods and λ, plus the
    method's own objective where it can be computed (DPO with precomputed references
    has no reference model left for unseen pairs)."""
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # objective, nll, batches
    iterator = iter(batches)
    # In step across ranks: under ZeRO-3 every forward gathers parameters from all of them.
    while (batch := next_batch_on_every_rank(iterator, device)) is not None:
        batch = to_device(batch, device)
        out = run_objective(engine, _validation_pass, method=objective, batch=batch, step=step)
        if objective.can_validate:
            sums[0] += float(out.metrics["objective"])
        sums[1] += float(out.loss)
        sums[2] += 1
    engine.train()
    if _world()[1] > 1:
        dist.all_reduce(sums)
    n = max(float(sums[2]), 1.0)
    out = {"val_nll": float(sums[1]) / n}
    if objective.can_validate:
        out["val_loss"] = float(sums[0]) / n
    return out


# --------------------------------------------------------------------------- the loop


StepCallback = Callable[[LoopState, dict[str, float], bool], None]


def run_training(
    cfg: TrainConfig,
    *,
    engine,
    objective: Objective,
    schedule: Schedule,
    state: LoopState,
    batches_for_epoch: Callable[[int], Iterable[dict[str, Any]]],
    validation_batches: Callable[[], Iterable[dict[str, Any]]] | None,
    device: torch.device,
    on_step: StepCallback,
    reference_table: ReferenceTable | None = None,
    on_epoch_end: Callable[[int, int], None] | None = None,
) -> LoopState:
    """Train until ``schedule.total_steps``; call ``on_step(state, metrics, is_last)`` after each step.

    ``batches_for_epoch(epoch)`` yields this rank's micro-batches of that epoch in
    a deterministic order, so a resume skips exactly ``state.micro_in_epoch`` of them.
    Every rank takes each micro-batch in step with the others
    (:func:`next_batch_on_every_rank`): when one rank's stream ends the epoch ends
    on all of them, and a bad row met by any rank stops all of them with
    :class:`StreamDataError`, so no rank is left waiting in a collective.
    ``on_step`` reports, logs and checkpoints (the Ray worker's job); when the streams run out
    before ``schedule.total_steps`` (bad rows skipped; packing, whose count is an estimate) the
    last step taken is reported again with ``is_last``, so the run still ends with its final
    checkpoint and export.  ``on_epoch_end(epoch, dropped)`` runs on every rank after each epoch
    (a collective is fine there), with the examples this rank read but did not train on.
    """
    o = cfg.optimization
    engine.train()
    window = LogWindow()

    while state.step < schedule.total_steps and state.epoch < o.epochs:
        epoch = state.epoch
        iterator: Iterator = iter(batches_for_epoch(epoch))
        for _ in range(state.micro_in_epoch):  # resume mid-epoch at the same data position
            next(iterator)
        while state.micro_in_epoch < schedule.micro_per_epoch and state.step < schedule.total_steps:
            batch = next_batch_on_every_rank(iterator, device)
            if batch is None:  # a rank's stream ended (bad rows skipped, sampling): the epoch ends for all
                break
            boundary, norm0 = _train_micro_batch(engine, objective, batch, state, window, reference_table, device)
            state.micro_in_epoch += 1
            if not boundary:
                continue
            state.step += 1
            is_last = state.step >= schedule.total_steps
            window.step_done(state, device)
            metrics: dict[str, float] = {}
            if state.step % o.log_every_n_steps == 0 or is_last:
                norm = norm0 if norm0 is not None else grad_norm(engine)
                metrics = window.flush(device, grad_norm=norm, lr=engine.get_lr()[0], state=state, schedule=schedule)
            if validation_batches is not None and (
                is_last or (o.eval_every_n_steps and state.step % o.eval_every_n_steps == 0)
            ):
                metrics.update(validation_metrics(engine, objective, validation_batches(), device, state.step))
            if state.micro_in_epoch >= schedule.micro_per_epoch:
                state.epoch += 1
                state.micro_in_epoch = 0
            on_step(state, metrics, is_last)
        if state.epoch == epoch and state.step < schedule.total_steps:  # the stream ended before the schedule
            state.epoch += 1
            state.micro_in_epoch = 0
        dropped = _drain(iterator) if state.step < schedule.total_steps else 0
        if on_epoch_end is not None:
            on_epoch_end(epoch, dropped)
    if 0 < state.step < schedule.total_steps:  # the streams ran out first: end as the schedule would have
        on_step(state, {}, True)
    return state


def _train_micro_batch(
    engine, objective: Objective, batch: dict[str, Any], state: LoopState, window: LogWindow,
    reference_table: ReferenceTable | None, device: torch.device,
) -> tuple[bool, float | None]:  # fmt: skip
    """Forward, backward and DeepSpeed's step on one micro-batch; (an optimizer step was taken, the
    ZeRO-0 gradient norm of that step).  DeepSpeed's own count decides the boundary; an epoch cut
    short leaves its partial accumulation to the next."""
    batch = to_device(batch, device)
    if reference_table is not None:
        attach_reference(batch, reference_table, device)
    out = objective(engine, batch, state.step)
    engine.backward(out.loss)
    boundary = engine.is_gradient_accumulation_boundary()
    # ZeRO >= 1 keeps the norm of the step it took; stage 0 has none, so it is taken before the step clears it.
    norm0 = _stage0_grad_norm(engine.module) if boundary and engine.zero_optimization_stage() == 0 else None
    engine.step()
    window.add(out, batch_tokens(batch))
    return boundary, norm0


class LogWindow:
    """The micro-batches since the last logged step: their mean loss and metrics, and the tokens
    and time behind the throughput figures."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}  # metric -> running sum (a tensor, or a float)
        self.micro_batches = 0
        self.tokens_step = 0  # this rank's tokens in the current optimizer step
        self.tokens = 0  # all ranks' tokens since the last log
        self.started = time.perf_counter()
        self.rank_tokens: list[int] = []

    def add(self, out: Any, tokens: int) -> None:
        """Add a micro-batch's loss and metrics to the window's running sums, kept as tensors where they
        are computed: no device-to-host copy (a sync that stalls the GPU's queue) until the logged step."""
        self.tokens_step += tokens
        values = {"loss": out.loss, **{k: v for k, v in out.metrics.items() if not k.startswith("num_")}}
        for k, v in values.items():
            v = v.detach() if isinstance(v, torch.Tensor) else v
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.micro_batches += 1

    def step_done(self, state: LoopState, device: torch.device) -> None:
        """Count the step's tokens over all ranks (a collective every step)."""
        self.rank_tokens = all_gather_int(self.tokens_step, device)
        step_tokens = sum(self.rank_tokens)
        state.tokens_seen += step_tokens
        self.tokens += step_tokens
        self.tokens_step = 0

    def flush(
        self, device: torch.device, *, grad_norm: float | None, lr: float, state: LoopState, schedule: Schedule
    ) -> dict[str, float]:
        """The logged step's metrics, averaged over ranks; starts a new window."""
        elapsed = time.perf_counter() - self.started
        metrics = all_reduce_mean({k: float(v) / self.micro_batches for k, v in self.sums.items()}, device)
        metrics["tokens_per_s"] = self.tokens / max(elapsed, 1e-9)  # all ranks together
        # This step's tokens per rank: packing should keep min and max close (no rank waits long).
        metrics["tokens_per_step_rank_mean"] = sum(self.rank_tokens) / len(self.rank_tokens)
        metrics["tokens_per_step_rank_min"] = min(self.rank_tokens)
        metrics["tokens_per_step_rank_max"] = max(self.rank_tokens)
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        metrics["lr"] = lr
        metrics["epoch"] = state.epoch + state.micro_in_epoch / schedule.micro_per_epoch
        self.sums, self.micro_batches, self.tokens, self.started = {}, 0, 0, time.perf_counter()
        return metrics
