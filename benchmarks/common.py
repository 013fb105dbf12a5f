"""Helpers shared by the benchmarks: machine description, load average, timing summaries.

No Ray import here (``benchmarks.step_time`` uses this module on GPU machines
without Ray).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipelines.tracking.provenance import git_commit

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def load_note(loads: Iterable[list[float] | None], cores: int | None = None) -> str | None:
    """A warning when the 1-minute load average exceeded the core count at any sample."""
    cores = cores or cpu_count()
    worst = max((load[0] for load in loads if load), default=None)
    if worst is not None and worst > cores:
        return (
            f"machine loaded: 1-min load average up to {worst:.1f} on {cores} cores while measuring "
            "(other processes shared the CPUs); absolute times are noisy, ratios measured side by "
            "side (interleaved) are the more reliable figures"
        )
    return None


def pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def memory_total_gib() -> float | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:  # not Linux
        return None
    for line in lines:
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on.  Package versions are read from metadata
    (importing ray here would break the no-Ray promise of the GPU path)."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_cores": cpu_count(),
        "memory_gib": memory_total_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            name: pkg_version(name)
            for name in ("torch", "transformers", "ray", "deepspeed", "datasets", "torch-discounted-cumsum")
        },
        "git_commit": git_commit(),
        "load_average_start": load_average(),
    }
    import torch

    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def summarize(times: list[float]) -> dict[str, float]:
    """Median and quartiles of a list of seconds."""
    xs = sorted(times)
    if not xs:
        return {"median_s": float("nan"), "p25_s": float("nan"), "p75_s": float("nan"), "n": 0}
    if len(xs) >= 2:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = xs[0]
    return {"median_s": statistics.median(xs), "p25_s": p25, "p75_s": p75, "min_s": xs[0], "n": len(xs)}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= 1000 * scale / 1024:  # 1000 MiB reads 0.98 GiB
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"
