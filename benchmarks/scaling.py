"""Scaling: pipeline tokens/s with 1 and 2 Ray Train workers, for ZeRO 0, 2 and 3.

Each cell is a real ``pipelines.orchestration.train.train`` run of the packaged ``tiny``
config (IFT, tiny preset, bundled chat data, DeepSpeed on CPU or GPU) for a
fixed number of optimizer steps, with MLflow, validation, intermediate
checkpoints and model registration off.  tokens/s is the run's own metric
(non-pad tokens of all ranks' micro-batches over the wall time of the logging
window, ``pipelines.training.loop.run_training``), taken from the last window: with
``log_every_n_steps = steps/2`` the first half of the steps (start-up, the
first compiled step) is excluded.

Workers keep their micro-batch (8 rows), so 2 workers process 2× the rows per
step (weak scaling); the efficiency is ``tokens/s(2 workers) / (2 ×
tokens/s(1 worker))``.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks.common import cpu_count, load_average


def run(
    workers: tuple[int, ...] = (1, 2),
    zero_stages: tuple[int, ...] = (0, 2, 3),
    steps: int = 20,
    method: str = "ift",
    log: Callable[[str], None] = print,
    extra_overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    from benchmarks.data_path import init_ray
    from pipelines.config_loading import load_config
    from pipelines.orchestration.train import train

    if steps < 2 or steps % 2:
        raise ValueError("steps must be an even number >= 2 (the second half is measured)")
    load_before = load_average()
    ray_init_s = init_ray()
    cells: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ift-bench-scaling-") as storage:
        for zero in zero_stages:
            for w in workers:
                name = f"bench-w{w}-z{zero}-{uuid.uuid4().hex[:6]}"
                cfg = load_config(
                    None,
                    [
                        f"run_name={name}",
                        f"method.name={method}",
                        f"scaling.num_workers={w}",
                        f"deepspeed.zero_stage={zero}",
                        f"optimization.max_steps={steps}",
                        f"optimization.log_every_n_steps={steps // 2}",
                        "optimization.eval_every_n_steps=0",
                        "data.validation=[]",
                        f"checkpointing.every_n_steps={10 * steps}",
                        f"checkpointing.storage_path={storage}",
                        "checkpointing.max_failures=0",
                        "mlflow.enabled=false",
                        "eval.at_end=false",
                        *extra_overrides,
                    ],
                )
                t = time.perf_counter()
                try:
                    res = train(cfg, show_progress=False, register=False)
                    tps = res.metrics.get("tokens_per_s")
                    cell = {
                        "workers": w,
                        "zero_stage": zero,
                        "tokens_per_s": tps,
                        "wall_s": time.perf_counter() - t,
                        "final_step": res.metrics.get("step"),
                        "load_average": load_average(),
                    }
                except Exception as exc:  # one failed cell must not lose the others
                    cell = {
                        "workers": w,
                        "zero_stage": zero,
                        "tokens_per_s": None,
                        "wall_s": time.perf_counter() - t,
                        "error": f"{type(exc).__name__}: {exc}"[:2000],
                    }
                cells[f"w{w}_z{zero}"] = cell
                log(
                    f"[scaling] {w} worker(s), ZeRO-{zero}: "
                    + (
                        f"{cell['tokens_per_s']:.0f} tokens/s"
                        if cell.get("tokens_per_s")
                        else f"failed: {cell.get('error')}"
                    )
                    + f" ({cell['wall_s']:.0f}s for the whole run)"
                )
    by_zero: dict[str, Any] = {}
    for zero in zero_stages:
        one, two = cells.get(f"w1_z{zero}", {}).get("tokens_per_s"), cells.get(f"w2_z{zero}", {}).get("tokens_per_s")
        if one and two:
            by_zero[str(zero)] = {"speedup_2_over_1": two / one, "efficiency": two / (2 * one)}
    return {
        "config": "packaged tiny config (IFT, tiny preset, bundled demo_chat.jsonl, max_length 256, micro-batch 8 per "
        "worker, 1 CPU per worker)",
        "method": method,
        "steps": steps,
        "measured_steps": f"{steps // 2 + 1}-{steps}",
        "cpu_cores": cpu_count(),
        "ray_init_s": ray_init_s,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cells": cells,
        "by_zero_stage": by_zero,
    }


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2")
    p.add_argument("--zero", default="0,2,3")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    out = run(
        tuple(int(x) for x in args.workers.split(",")), tuple(int(x) for x in args.zero.split(",")), steps=args.steps
    )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
