"""IFT ÷ SFT step time under ZeRO-3 next to the same ratio under ZeRO-0, and what ZeRO-3's
prefetcher saw, on a real 2-process gloo group (CPU).

ZeRO-3 records the order in which a step uses the modules (from one call of the engine's root
module to the next) and prefetches parameters along it while it repeats.  IFT's two passes per
micro-batch, made as two calls of the engine, never repeat one order: the trace is thrown away
every step and every parameter is gathered when needed, synchronously.  The training engine's
module is an :class:`ift.forward.ObjectiveForward`, so the objective makes all its passes inside
one engine call.  Variants, each its own engine built from the same start weights, stepping on the
same micro-batch of each rank in interleaved rounds:

* ``sft`` and ``ift`` under ZeRO-0 and ZeRO-3, through ``Objective.__call__`` (one engine call);
* ``ift_two_calls`` under ZeRO-3: the same objective with each pass its own call of the engine
  (``Objective.compute(engine, ...)``), the layout before ``ift.forward``.

Step = the objective, ``engine.backward`` and ``engine.step``.  The ratios are medians of
per-round paired ratios of rank 0's wall-clock step times.  The trace figures are counted inside
DeepSpeed's ``PartitionedParameterCoordinator`` (:func:`count_trace`) per step, after the warm-up
rounds.  Never imports Ray::

    python -m benchmarks.run --only zero3 --out benchmarks/results/zero3
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import fmt_ratio, load_average

# (ZeRO stage, variant) in the order they are built; every round steps each once (rotating order).
VARIANTS: tuple[tuple[int, str], ...] = ((0, "sft"), (0, "ift"), (3, "sft"), (3, "ift"), (3, "ift_two_calls"))
COUNTS = ("root_forwards", "incomplete_resets", "invalidations", "sync_fetches", "sync_numel", "gathered_numel")


# --------------------------------------------------------------------------- counting inside DeepSpeed


_COUNTERS: dict[int, Counter] = {}


@contextlib.contextmanager
def count_trace() -> Iterator[dict[int, Counter]]:
    """Count, per ``PartitionedParameterCoordinator`` (one per ZeRO-3 engine; :func:`counts_of`):

    * ``root_forwards``: ``reset_step`` calls (one per call of the engine's root module);
    * ``incomplete_resets``: those made while the trace was not complete (recording or invalid);
    * ``invalidations``: ``_invalidate_trace`` calls (the step's module order left the recorded one);
    * ``sync_fetches`` / ``sync_numel``: modules whose parameters were not gathered, nor in flight,
      when the module ran (a synchronous all-gather, nothing prefetched), and their elements;
    * ``gathered_numel``: every element all-gathered (fetches and prefetches).

    Patches the class for the duration (in this process only)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params
    from deepspeed.utils import z3_leaf_module

    gather = "_PartitionedParameterCoordinator__all_gather_params"
    originals = {name: C.__dict__[name] for name in ("reset_step", "_invalidate_trace", "fetch_sub_module", gather)}

    def reset_step(self):
        c = _COUNTERS.setdefault(id(self), Counter())
        c["root_forwards"] += 1
        c["incomplete_resets"] += not self.is_complete_trace()
        return originals["reset_step"](self)

    def invalidate(self):
        _COUNTERS.setdefault(id(self), Counter())["invalidations"] += 1
        return originals["_invalidate_trace"](self)

    def fetch_sub_module(self, current_submodule, forward):
        params = iter_params(current_submodule, recurse=z3_leaf_module(current_submodule))
        missing = [p.ds_numel for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if missing:
            c = _COUNTERS.setdefault(id(self), Counter())
            c["sync_fetches"] += 1
            c["sync_numel"] += sum(missing)
        return originals["fetch_sub_module"](self, current_submodule, forward)

    def all_gather(self, params, forward):
        c = _COUNTERS.setdefault(id(self), Counter())
        c["gathered_numel"] += sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE)
        return originals[gather](self, params, forward)

    patched = {"reset_step": reset_step, "_invalidate_trace": invalidate, "fetch_sub_module": fetch_sub_module}
    patched[gather] = all_gather
    for name, fn in patched.items():
        setattr(C, name, fn)
    try:
        yield _COUNTERS
    finally:
        for name, fn in originals.items():
            setattr(C, name, fn)


def coordinator_of(engine) -> Any:
    """The ``PartitionedParameterCoordinator`` of a ZeRO-3 engine (one with no optimizer too); None below stage 3."""
    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)  # no optimizer: the offload itself
    if not hasattr(offload, "get_param_coordinator"):
        return None
    try:
        return offload.get_param_coordinator()
    except TypeError:  # deepspeed < 0.17 keeps one per mode
        return offload.get_param_coordinator(training=True)


def counts_of(engine) -> Counter:
    """A copy of what :func:`count_trace` has counted for ``engine`` so far."""
    return Counter(_COUNTERS.get(id(coordinator_of(engine)), Counter()))


def trace_modules(engine) -> int | None:
    """Modules in the engine's recorded trace, or None while it is not complete."""
    coordinator = coordinator_of(engine)
    if coordinator is None or not coordinator.is_complete_trace():
        return None
    return len(coordinator._PartitionedParameterCoordinator__submodule_order)


# --------------------------------------------------------------------------- one rank


def _config(zero: int, method: str, model: str, batch_size: int):
    from pipelines.config_loading import load_config

    return load_config(
        None,
        [
            f"model.name={model}",
            f"method.name={method}",
            f"deepspeed.zero_stage={zero}",
            "deepspeed.precision=fp32",
            f"optimization.micro_batch_size={batch_size}",
            "optimization.warmup_ratio=0",
            "optimization.schedule=constant",
            "optimization.lr=1e-4",
        ],
    )


def _step(engine, objective, batch: dict, two_calls: bool) -> None:
    out = objective.compute(engine, batch, 0) if two_calls else objective(engine, batch, 0)
    engine.backward(out.loss)
    engine.step()


def _rank_main(rank: int, world: int, port: int, spec: dict[str, Any], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _measure(rank, spec)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as the 2-process tests do: skip a teardown that can abort on a joinable gloo thread


def _measure(rank: int, spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.step_time import build_batches
    from pipelines.training.build import build_engine, build_model_and_tokenizer
    from pipelines.training.methods import build_objective

    cpu = torch.device("cpu")
    with count_trace():
        runners = {}
        for zero, variant in VARIANTS:
            cfg = _config(zero, "sft" if variant == "sft" else "ift", spec["model"], spec["batch_size"])
            model, tokenizer = build_model_and_tokenizer(cfg)
            objective = build_objective(cfg.method, model, cpu, seed=0, rank=rank)
            runners[(zero, variant)] = (build_engine(cfg, model, 10**6, use_gpu=False), objective)
        batch, _ = build_batches(tokenizer, spec["batch_size"], spec["seq_len"], seed=rank)
        times: dict[tuple[int, str], list[float]] = {key: [] for key in runners}
        counted: dict[tuple[int, str], list[Counter]] = {key: [] for key in runners if key[0] == 3}
        rounds = spec["warmup"] + spec["steps"]
        for r in range(rounds):
            order = list(runners)[r % len(runners) :] + list(runners)[: r % len(runners)]
            for key in order:
                engine, objective = runners[key]
                before = counts_of(engine) if key[0] == 3 else None
                t0 = time.perf_counter()
                _step(engine, objective, batch, two_calls=key[1] == "ift_two_calls")
                elapsed = time.perf_counter() - t0
                if r >= spec["warmup"]:
                    times[key].append(elapsed)
                    if before is not None:
                        counted[key].append(counts_of(engine) - before)
        trace = {key: trace_modules(runners[key][0]) for key in counted}
    return {"times": times, "counted": counted, "trace": trace}


# --------------------------------------------------------------------------- the section


def _paired_ratio(times: dict, num: tuple[int, str], den: tuple[int, str]) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def run(
    *,
    model: str = "tiny",
    batch_size: int = 4,
    seq_len: int = 128,
    warmup: int = 3,
    steps: int = 20,
    workers: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    import tempfile

    import torch.multiprocessing as mp

    spec = {"model": model, "batch_size": batch_size, "seq_len": seq_len, "warmup": warmup, "steps": steps}
    load_before = load_average()
    log(f"[zero3] {workers} gloo workers, {model}, batch {batch_size} x {seq_len}, {warmup}+{steps} rounds")
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = str(Path(tmp) / "rank0.pt")
        mp.start_processes(_rank_main, args=(workers, port, spec, out), nprocs=workers, start_method="spawn")
        raw = torch.load(out, weights_only=False)
    times = raw["times"]
    variants: dict[str, Any] = {}
    for (zero, variant), ts in times.items():
        entry: dict[str, Any] = {"zero_stage": zero, "method": variant, "median_s": statistics.median(ts)}
        if (zero, variant) in raw["counted"]:
            per_step = raw["counted"][(zero, variant)]
            entry["per_step"] = {k: statistics.median(c[k] for c in per_step) for k in COUNTS}
            entry["steps_with_invalidation"] = sum(1 for c in per_step if c["invalidations"])
            entry["trace_modules"] = raw["trace"][(zero, variant)]
        variants[f"zero{zero}_{variant}"] = entry
    ratios = {
        "zero0_ift_over_sft": _paired_ratio(times, (0, "ift"), (0, "sft")),
        "zero3_ift_over_sft": _paired_ratio(times, (3, "ift"), (3, "sft")),
        "zero3_ift_two_calls_over_sft": _paired_ratio(times, (3, "ift_two_calls"), (3, "sft")),
    }
    ratios["zero3_over_zero0"] = ratios["zero3_ift_over_sft"] / ratios["zero0_ift_over_sft"]
    ratios["zero3_two_calls_over_zero0"] = ratios["zero3_ift_two_calls_over_sft"] / ratios["zero0_ift_over_sft"]
    sft = variants["zero3_sft"]["per_step"]["gathered_numel"]
    for name in ("zero3_ift", "zero3_ift_two_calls"):
        variants[name]["gathered_over_sft"] = variants[name]["per_step"]["gathered_numel"] / sft if sft else None
    for name, value in ratios.items():
        log(f"[zero3] {name}: {value:.3f}")
    return {
        "config": {**spec, "workers": workers, "backend": "gloo", "device": "cpu", "torch_threads": 1},
        "variants": variants,
        "ratios": ratios,
        "methods": {"ift": {"zero3_over_zero0": ratios["zero3_over_zero0"]}},  # what the runner's target reads
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def render(s: dict[str, Any]) -> list[str]:
    lines = ["## 9. ZeRO-3: IFT's passes in one engine forward", ""]
    if "error" in s:
        return [*lines, f"Failed: `{s['error'][:300]}`", ""]
    c, r = s["config"], s["ratios"]
    lines += [
        f"`{c['model']}`, {c['workers']} gloo workers on CPU ({c['torch_threads']} thread each), float32, batch "
        f"{c['batch_size']} x {c['seq_len']} tokens per rank; {c['steps']} timed rounds after {c['warmup']} warm-up "
        "rounds, variants interleaved; see `benchmarks/zero3_passes.py`.  `ift_two_calls` makes each pass its own "
        "call of the engine (the layout before `ift.forward`).  Load average before/after: "
        f"{s.get('load_average_before')} / {s.get('load_average_after')}.",
        "",
        f"IFT ÷ SFT step time: ZeRO-0 {fmt_ratio(r['zero0_ift_over_sft'])}, "
        f"ZeRO-3 {fmt_ratio(r['zero3_ift_over_sft'])} "
        f"({r['zero3_over_zero0']:.2f}x the ZeRO-0 ratio; goal within 1.10x); with two engine calls per micro-batch "
        f"{fmt_ratio(r['zero3_ift_two_calls_over_sft'])} ({r['zero3_two_calls_over_zero0']:.2f}x).",
        "",
        "| ZeRO | variant | step, ms | root forwards | trace recording or invalid at reset | invalidations "
        "| synchronous all-gathers | elements gathered (x SFT) | modules in the trace |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in s["variants"].values():
        ps = e.get("per_step")
        if ps is None:
            lines.append(f"| {e['zero_stage']} | {e['method']} | {e['median_s'] * 1e3:.1f} | | | | | | |")
            continue
        ratio = e.get("gathered_over_sft")
        gathered = f"{ps['gathered_numel']:,.0f}" + (f" ({ratio:.2f}x)" if ratio is not None else "")
        lines.append(
            f"| {e['zero_stage']} | {e['method']} | {e['median_s'] * 1e3:.1f} | {ps['root_forwards']:g} "
            f"| {ps['incomplete_resets']:g} | {ps['invalidations']:g} | {ps['sync_fetches']:g} | {gathered} "
            f"| {e['trace_modules'] if e['trace_modules'] is not None else 'incomplete'} |"
        )
    lines += ["", "Trace figures are per step (median over the timed steps, rank 0)."]
    return [*lines, ""]
