"""The run's progress and outcome actor, and where the driver's helper actors live."""

from __future__ import annotations

import threading
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm.auto import tqdm


@ray.remote(num_cpus=0)
class ProgressTracker:
    """Rank 0 pushes (step, metrics) here; the driver polls it for the progress bar, and reads
    the run's outcomes at the end (the bad row that stopped it, the skipped-rows report)."""

    def __init__(self) -> None:
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.outcomes: dict[str, Any] = {}

    def set_outcome(self, key: str, value: Any) -> None:
        self.outcomes[key] = value

    def outcome(self) -> dict[str, Any]:
        return self.outcomes

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self.metrics.update(metrics)

    def get(self) -> tuple[int, dict[str, float]]:
        return self.step, self.metrics


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Where the driver's helper actors go: its own node, as Ray Train places its controller.  A
    worker node may be lost mid-run; the driver's node outlives the run or ends it anyway."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def poll_progress(tracker: Any, bar: tqdm, done: threading.Event) -> None:
    """Move ``bar`` to the tracker's step, with loss, validation NLL and throughput, until ``done``."""
    while not done.wait(0.5):
        try:
            step, metrics = ray.get(tracker.get.remote(), timeout=5)
        except Exception:  # the tracker is best effort; training does not depend on it
            continue
        bar.n = step
        post = {}
        for key, fmt in (("loss", "{:.4f}"), ("val_nll", "{:.4f}"), ("tokens_per_s", "{:.0f}")):
            if key in metrics:
                post[key.replace("tokens_per_s", "tok/s")] = fmt.format(metrics[key])
        bar.set_postfix(post, refresh=False)
        bar.refresh()
