"""Ray Train reports: seconds per optimizer step when every logged step is reported to Ray
Train, against reporting only checkpoints and evaluations (the default).

Ray Train 2.60 takes one report per controller poll (every 2 s, a result queue of one) and a
report waits for the previous one to be taken, so reporting every step caps a run at one step
per poll interval whenever a step is faster than that.  Both cells are real
``pipelines.orchestration.train.train`` runs of the packaged ``tiny`` config (IFT, 1 worker, one logged
step each, MLflow on a temporary sqlite store); seconds per step come from the MLflow
timestamps of each step's loss, from step 5 on (start-up excluded).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_count, load_average

MEASURED_FROM = 5


def run(steps: int = 30, log: Callable[[str], None] = print) -> dict[str, Any]:
    import mlflow

    from benchmarks.data_path import init_ray
    from pipelines.config_loading import load_config
    from pipelines.orchestration.train import train

    if steps <= MEASURED_FROM:
        raise ValueError(f"steps must exceed {MEASURED_FROM} (steps {MEASURED_FROM}+ are measured)")
    load_before = load_average()
    init_ray()
    cells: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ift-bench-report-") as tmp:
        for name, each_step in (("checkpoints_and_evaluations", False), ("every_logged_step", True)):
            store = f"sqlite:///{Path(tmp) / f'{name}.db'}"
            cfg = load_config(
                None,
                [
                    f"run_name=bench-report-{name}", "scaling.num_workers=1", f"optimization.max_steps={steps}",
                    "optimization.log_every_n_steps=1", "optimization.eval_every_n_steps=0", "data.validation=[]",
                    f"checkpointing.every_n_steps={10 * steps}", f"checkpointing.storage_path={tmp}",
                    f"mlflow.tracking_uri={store}", "mlflow.experiment=bench-report",
                    "mlflow.registered_model_name=null",
                ],
            )  # fmt: skip
            t = time.perf_counter()
            res = train(cfg, show_progress=False, register=False, report_each_log_step=each_step)
            wall = time.perf_counter() - t
            history = mlflow.MlflowClient(store).get_metric_history(res.mlflow_run_id, "loss")
            stamps = sorted((m.step, m.timestamp) for m in history if m.step >= MEASURED_FROM)
            per_step = (stamps[-1][1] - stamps[0][1]) / 1000 / (stamps[-1][0] - stamps[0][0])
            cells[name] = {"seconds_per_step": per_step, "wall_s": wall, "load_average": load_average()}
            log(f"[report] {name}: {per_step:.3f} s/step, {wall:.0f} s for the whole run")
    ratio = cells["every_logged_step"]["seconds_per_step"] / cells["checkpoints_and_evaluations"]["seconds_per_step"]
    return {
        "config": "packaged tiny config (IFT, tiny preset, bundled demo_chat.jsonl), 1 worker, log_every_n_steps=1",
        "steps": steps,
        "measured_steps": f"{MEASURED_FROM}-{steps}",
        "cpu_cores": cpu_count(),
        "load_average_before": load_before,
        "cells": cells,
        "slowdown_every_logged_step": ratio,
    }


def render(r: dict[str, Any]) -> list[str]:
    lines = ["## 8. Ray Train reports: every logged step vs checkpoints and evaluations", ""]
    if "error" in r:
        return lines + [f"Failed: `{r['error'][:300]}`", ""]
    a, b = r["cells"]["checkpoints_and_evaluations"], r["cells"]["every_logged_step"]
    return lines + [
        f"`ift train` ({r['config']}), {r['steps']} steps; seconds per step over steps {r['measured_steps']} "
        f"from the MLflow timestamps; {r['cpu_cores']} cores.",
        "",
        "| reported to Ray Train | s/step | whole run, s |",
        "|---|---|---|",
        f"| checkpoints and evaluations (default) | {a['seconds_per_step']:.3f} | {a['wall_s']:.0f} |",
        f"| every logged step | {b['seconds_per_step']:.3f} | {b['wall_s']:.0f} |",
        "",
        f"Reporting every logged step makes a step {r['slowdown_every_logged_step']:.1f}x slower here.",
        "",
    ]
