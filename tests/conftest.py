"""Shared fixtures: tiny models built from a config (no hub access anywhere)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Ray Train's controller polls its workers every 2 s, and a worker's report (one per checkpoint, and the
# empty one that waits for it to be committed) returns only at the next poll: up to 4 s a checkpoint.  The
# tests checkpoint every few steps of runs that last seconds, so they poll every 0.2 s.  Set before any
# Ray process starts: the clusters the tests start (in process, `ray start`, cluster_utils) inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def build_llama(vocab: int = 32, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # Larger-than-default init so greedy predictions differ from targets and IFT's fusion matters.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture
def llama64() -> LlamaForCausalLM:
    return build_llama()


# --------------------------------------------------------------------------- nothing left running

# Processes the suite starts through Ray, the S3 and MLflow servers: none may outlive it.
SERVICE_MARKERS = ("ray::", "raylet", "gcs_server", "dashboard/agent.py", "runtime_env/agent", "log_monitor.py",
                   "moto.server", "mlflow.server", "mlflow server", "default_worker.py")  # fmt: skip
_SESSION_START = __import__("time").time()


def leftover_processes() -> list[tuple[int, str]]:
    """(pid, command) of service processes this session started that are still alive: those below
    this pytest process, and orphans (re-parented to init) started since the session began."""
    import os

    import psutil

    me = os.getpid()
    out = []
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "create_time"]):
        info = proc.info
        cmd = " ".join(info.get("cmdline") or ())
        if info["pid"] == me or not any(m in cmd for m in SERVICE_MARKERS):
            continue
        try:
            ours = any(parent.pid == me for parent in proc.parents())
        except psutil.Error:
            continue
        orphan = info["ppid"] == 1 and info["create_time"] >= _SESSION_START
        if ours or orphan:
            out.append((info["pid"], cmd[:160]))
    return out


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a process of a Ray cluster or a server the tests started survives it
    (after 30 s of grace: Ray's processes notice their raylet is gone within a few seconds).

    Under pytest-xdist the controller checks, once every worker has ended: what the workers started
    descends from it, and a worker that finished early would see the other's orphans as its own."""
    import os
    import time

    if os.environ.get("PYTEST_XDIST_WORKER"):
        return

    deadline = time.monotonic() + 30
    while (left := leftover_processes()) and time.monotonic() < deadline:
        time.sleep(1)
    if left:
        lines = "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in left)
        print(f"\nFAILED: {len(left)} process(es) started by the tests outlived them:\n{lines}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
