"""Peak host memory of each Ray Train worker, ZeRO-0 against ZeRO-3, sampled from outside the workers.

Each cell is a real ``pipelines.orchestration.train.train`` run: the ``tiny-100m`` preset (101M
parameters, float32 on CPU), IFT, 2 workers, a few optimizer steps, the final
checkpoint and the Hugging Face export included (MLflow and validation off).  A
thread in this process reads the resident set size (RSS) of every
``ray::RayTrainWorker`` process every 50 ms with psutil and keeps each one's peak:
what a node's memory has to hold, whatever inside the process holds it.

Each stage runs twice: with the project's default, where each worker fixes glibc's mmap
threshold at 128 KiB (``scaling.worker_mmap_threshold_bytes``,
:mod:`pipelines.training.host_memory`), and with glibc's own dynamic threshold
(``scaling.worker_mmap_threshold_bytes=0``).  glibc raises its threshold after the first
large free, so later tensors of that size come from the heap and stay resident after
they are freed: RSS then shows the high-water mark of every transient buffer
(gathered layers, gradient buckets), not what is live.  With the threshold fixed each
freed tensor goes back to the kernel, so RSS tracks live memory.

Beside each measurement stand the model states the ZeRO paper counts for that
stage (:func:`pipelines.training.estimate.estimate_memory`: parameters, gradients, Adam
moments) and DeepSpeed's own ZeRO-3 buffers, named with their configured sizes.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks.common import cpu_count, load_average

WORKER_TITLE = "ray::RayTrainWorker"
MiB = 1024**2
NOT_MODEL_STATES = ("activations", "logits")  # the estimate's other lines


class PeakRSS(threading.Thread):
    """Peak RSS per Ray Train worker process (pid -> bytes), sampled from outside."""

    def __init__(self, every_s: float = 0.05):
        super().__init__(daemon=True)
        self.every_s, self.peaks, self._done = every_s, {}, threading.Event()

    def run(self) -> None:
        import psutil

        while not self._done.is_set():
            for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd = " ".join(proc.info.get("cmdline") or ())
                mem = proc.info.get("memory_info")
                if cmd.startswith(WORKER_TITLE) and mem is not None:
                    self.peaks[proc.info["pid"]] = max(self.peaks.get(proc.info["pid"], 0), mem.rss)
            self._done.wait(self.every_s)

    def stop(self) -> dict[int, int]:
        self._done.set()
        self.join()
        return dict(self.peaks)


def deepspeed_buffers(ds_config: dict[str, Any], hidden_size: int) -> dict[str, Any]:
    """DeepSpeed's ZeRO-3 knobs that size memory beside the model states, as configured (DeepSpeed's
    defaults where unset), in elements."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
    return {
        "reduce_bucket_size": z.reduce_bucket_size,
        "stage3_prefetch_bucket_size": z.prefetch_bucket_size,
        "stage3_param_persistence_threshold": z.param_persistence_threshold,
        "stage3_max_live_parameters": z.max_live_parameters,
        "hidden_size": hidden_size,
    }


# Allocator setting -> scaling.worker_mmap_threshold_bytes; the first is the project's default.
MALLOC = {"default: mmap threshold 128 KiB": 131072, "glibc dynamic threshold": 0}
DEFAULT_MALLOC = next(iter(MALLOC))


def _restart_ray() -> None:
    """A fresh local cluster: new worker processes, whose allocator has seen nothing yet."""
    import os

    import ray

    ray.shutdown()
    ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 2, 2), log_to_driver=False)


def run(
    zero_stages: tuple[int, ...] = (0, 3),
    workers: int = 2,
    steps: int = 2,
    model: str = "tiny-100m",
    malloc: tuple[str, ...] = tuple(MALLOC),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    import ray

    from pipelines.config_loading import load_config
    from pipelines.orchestration.train import train
    from pipelines.training.build import deepspeed_config
    from pipelines.training.estimate import estimate_memory, model_shape

    cells: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ift-bench-zero-memory-") as storage:
        for allocator, zero in ((a, z) for a in malloc for z in zero_stages):
            _restart_ray()
            cfg = load_config(
                None,
                [
                    f"run_name=bench-mem-z{zero}-{uuid.uuid4().hex[:6]}",
                    f"model.name={model}",
                    f"scaling.num_workers={workers}",
                    f"deepspeed.zero_stage={zero}",
                    f"scaling.worker_mmap_threshold_bytes={MALLOC[allocator]}",
                    f"optimization.max_steps={steps}",
                    "optimization.micro_batch_size=2",
                    "data.max_length=128",
                    "optimization.eval_every_n_steps=0",
                    "data.validation=[]",
                    f"checkpointing.storage_path={storage}",
                    "checkpointing.max_failures=0",
                    "mlflow.enabled=false",
                    "eval.at_end=false",
                ],
            )
            shape = model_shape(cfg)
            states = estimate_memory(cfg, shape, use_gpu=False)
            sampler = PeakRSS()
            sampler.start()
            t = time.perf_counter()
            error = None
            try:
                train(cfg, show_progress=False, register=False)
            except Exception as exc:  # one failed cell must not lose the others
                error = f"{type(exc).__name__}: {exc}"[:2000]
            peaks = sampler.stop()
            model_states = sum(v for k, v in states.per_gpu.items() if k not in NOT_MODEL_STATES)
            cell = {
                "allocator": allocator,
                "zero_stage": zero,
                "workers": workers,
                "wall_s": time.perf_counter() - t,
                "peak_rss_mib_per_worker": sorted(round(v / MiB) for v in peaks.values()),
                "model_states_mib_per_worker": round(model_states / MiB),
                "estimate_mib": {k: round(v / MiB) for k, v in states.per_gpu.items()},
                "parameters": shape.parameters,
                "load_average": load_average(),
            }
            if zero == 3:
                cell["deepspeed_buffers"] = deepspeed_buffers(deepspeed_config(cfg, False, shape.hidden), shape.hidden)
            if error:
                cell["error"] = error
            cells[f"{allocator}/z{zero}"] = cell
            log(
                f"[zero_memory] {allocator}, ZeRO-{zero}, {workers} workers: peak RSS per worker "
                f"{cell['peak_rss_mib_per_worker']} MiB, model states {cell['model_states_mib_per_worker']} MiB"
                + (f" — failed: {error}" if error else "")
            )
    ray.shutdown()
    out: dict[str, Any] = {"model": model, "workers": workers, "steps": steps, "cpu_cores": cpu_count(), "cells": cells}
    ratios = {}
    for allocator in malloc:
        z0, z3 = cells.get(f"{allocator}/z0"), cells.get(f"{allocator}/z3")
        if z0 and z3 and z0["peak_rss_mib_per_worker"] and z3["peak_rss_mib_per_worker"]:
            ratios[allocator] = max(z3["peak_rss_mib_per_worker"]) / max(z0["peak_rss_mib_per_worker"])
    if ratios:  # the target reads the default settings
        key = DEFAULT_MALLOC if DEFAULT_MALLOC in ratios else next(iter(ratios))
        out["zero3_over_zero0_peak_rss"] = ratios
        out["methods"] = {"ift": {"zero3_over_zero0_peak_rss": ratios[key], "allocator": key}}
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zero", default="0,3")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--model", default="tiny-100m")
    args = p.parse_args(argv)
    out = run(
        tuple(int(x) for x in args.zero.split(",")), args.workers, args.steps, args.model,
        log=lambda m: print(m, file=sys.stderr),
    )  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
