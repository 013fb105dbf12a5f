"""Nothing left running: the suite's own guard (tests/conftest.py) fails the run when a service process
the tests started survives it, and `ift train` / `ift sweep` end every process they started."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import leftover_processes


def test_a_server_process_left_running_is_reported_until_it_is_stopped():
    # A stand-in with a server's command line (the guard matches on it), started by this session.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "moto.server"])
    try:
        assert proc.pid in [pid for pid, _ in leftover_processes()]
    finally:
        proc.kill()
        proc.wait()
    assert proc.pid not in [pid for pid, _ in leftover_processes()]


# `ift train` and `ift sweep` start a private Ray cluster in their own process (address="local"):
# when the command ends, so must every process of it.  A marker in the command's environment,
# which Ray's processes inherit, tells them apart from the clusters other tests run.
MARK = "IFT_LEFTOVER_CHECK"
IFT = Path(sys.executable).parent / "ift"


def processes_marked(mark: str) -> list[tuple[int, str]]:
    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.environ().get(MARK) == mark:
                out.append((proc.pid, " ".join(proc.info["cmdline"] or ())[:160]))
        except psutil.Error:  # gone, or another user's
            continue
    return out


def run_marked(tmp_path: Path, *argv: str) -> list[tuple[int, str]]:
    """Run ``ift ARGV`` to its end; the processes it started still alive 30 s later."""
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    r = subprocess.run([str(IFT), *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ended = time.monotonic()
    while (left := processes_marked(mark)) and time.monotonic() < ended + 30:
        time.sleep(1)
    print(f"ift {argv[0]}: {ended - started:.0f} s; its processes gone {time.monotonic() - ended:.0f} s after it ended")
    return left


def common(tmp_path: Path) -> list[str]:
    return [
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"checkpointing.storage_path={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.train.0.max_rows=32", "data.validation.0.max_rows=8",
        "optimization.max_steps=2", "optimization.eval_every_n_steps=2", "scaling.num_workers=1",
        "scaling.use_gpu=false", "mlflow.registered_model_name=null",
    ]  # fmt: skip


@pytest.mark.slow
def test_ift_train_leaves_no_process_behind(tmp_path):
    assert run_marked(tmp_path, "train", "--no-progress", "tiny", *common(tmp_path)) == []


@pytest.mark.slow
def test_ift_sweep_leaves_no_process_behind(tmp_path):
    left = run_marked(
        tmp_path, "sweep", "--quiet", "--space", "method.lam=grid(0.2)", "--space", "method.decay=none",
        "tiny-sweep", "sweep.scheduler.type=none", *common(tmp_path),
    )  # fmt: skip
    assert left == []
