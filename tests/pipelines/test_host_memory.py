"""pipelines.training.host_memory: a worker's freed tensors leave its resident memory.

Each case runs in a fresh interpreter: glibc's threshold is per process and only moves one way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config_loading import load_config
from pipelines.training.host_memory import MAX_MMAP_THRESHOLD, return_freed_memory

ROOT = Path(__file__).resolve().parents[2]

# Free an 8 MiB tensor (glibc then serves blocks up to 8 MiB from its heap), allocate forty 4 MiB
# tensors, free all but the last, and report how much of the 156 MiB freed is still resident.
PROBE = """
import json, os, sys
import torch
from pipelines.training.host_memory import return_freed_memory
applied = return_freed_memory(int(sys.argv[1]))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = torch.ones(2 * 2**20)
del big
base = rss()
tensors = [torch.ones(2**20) for _ in range(40)]
del tensors[:-1]
print(json.dumps({"applied": applied, "retained_mib": (rss() - base) / 2**20}))
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")


def _probe(threshold: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(threshold)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@linux_only
def test_with_glibcs_default_threshold_freed_tensors_stay_resident():
    seen = _probe(0)
    assert not seen["applied"] and seen["retained_mib"] > 100  # what the setting exists for


@linux_only
def test_with_the_threshold_fixed_freed_tensors_go_back_to_the_system():
    seen = _probe(131072)
    assert seen["applied"] and seen["retained_mib"] < 16  # the one tensor still alive, and slack


def test_a_threshold_glibc_would_refuse_is_an_error():
    with pytest.raises(ValueError, match="mmap threshold"):
        return_freed_memory(MAX_MMAP_THRESHOLD + 1)


def test_workers_fix_the_threshold_by_default_and_a_resume_may_change_it():
    cfg = load_config(None, [])
    assert cfg.scaling.worker_mmap_threshold_bytes == 131072
    changed = load_config(None, ["scaling.worker_mmap_threshold_bytes=0"])
    assert changed.training_settings() == cfg.training_settings()  # not a training setting
