"""Nothing left running: the suite's own guard (tests/conftest.py) fails the run when a service process
the tests started survives it, and `ift train` / `ift sweep` end every process they started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from ift.toydata import make_conversations, write_jsonl
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


def run_marked(cwd: Path, *argv: str) -> tuple[list[tuple[int, str]], str]:
    """Run ``ift ARGV`` to its end: the processes it started still alive 30 s later, and its output."""
    mark = uuid.uuid4().hex
    env = {**os.environ, MARK: mark}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    r = subprocess.run([str(IFT), *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ended = time.monotonic()
    while (left := processes_marked(mark)) and time.monotonic() < ended + 30:
        time.sleep(1)
    print(f"ift {argv[0]}: {ended - started:.0f} s; its processes gone {time.monotonic() - ended:.0f} s after it ended")
    return left, r.stdout


def common(tmp_path: Path) -> list[str]:
    return [
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"checkpointing.storage_path={tmp_path / 'runs'}",
        f"data.cache_dir={tmp_path / 'cache'}", "optimization.max_steps=2", "optimization.eval_every_n_steps=2",
        "scaling.num_workers=1", "scaling.use_gpu=false", "mlflow.registered_model_name=null",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory):
    """`ift train data.train=mine.jsonl`, as the README's "your own data" shows it."""
    root = tmp_path_factory.mktemp("own_data")
    write_jsonl(make_conversations(40, seed=3), root / "mine.jsonl")
    left, out = run_marked(root, "train", "--no-progress", "data.train=mine.jsonl", *common(root))
    return root, left, out


@pytest.mark.slow
def test_ift_train_leaves_no_process_behind(own_data_run):
    assert own_data_run[1] == []


@pytest.mark.slow
def test_training_on_a_bare_path_holds_its_validation_out_of_it_and_says_so(own_data_run):
    import mlflow

    root, _, out = own_data_run
    assert "note: data.train is new and data.validation is not: validation is 5% of the new training data" in out
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ift-demo").experiment_id])
    plan = json.loads(Path(client.download_artifacts(run.info.run_id, "data_plan.json", str(root))).read_text())
    # About 5% of the 40 rows (the hold-out is drawn per row, seeded), all of them from mine.jsonl.
    assert 0 < plan["validation_rows"] < 8 and plan["train_rows"] + plan["validation_rows"] == 40
    assert client.get_metric_history(run.info.run_id, "val_nll")


@pytest.mark.slow
def test_ift_sweep_leaves_no_process_behind(tmp_path):
    left, _ = run_marked(
        tmp_path, "sweep", "--quiet", "--space", "method.lam=grid(0.2)", "--space", "method.decay=none",
        "tiny-sweep", "sweep.scheduler.type=none", "data.train.0.max_rows=32", "data.validation.0.max_rows=8",
        *common(tmp_path),
    )  # fmt: skip
    assert left == []
