"""`make gpu-check` (benchmarks/gpu_check.py) without a GPU: it refuses in one line, and its ``--smoke``
mode runs the same code path on CPU (tiny preset, gloo, one process, ZeRO-2, sdpa) and writes every figure.

No timing assertions: the figures are measured on a GPU node, not tested.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import DEEPSPEED_SPEC, NO_GPU_MESSAGE

ROOT = Path(__file__).resolve().parents[2]
CELLS = {"zero2/sdpa/sft", "zero2/sdpa/ift", "zero2/sdpa/dpo"}
CELL_FIGURES = (
    "step_time_s",
    "tokens_per_s",
    "tokens_per_step_per_gpu",
    "flops_per_step_per_gpu",
    "achieved_tflops_per_gpu",
    "mfu",
    "mfu_with_attention",
    "peak_mem_bytes",
    "estimate_bytes",
    "peak_over_estimate",
    "final_loss",
    "cell_s",
)
TOP_KEYS = (
    "device_name", "backend", "machine", "settings", "model", "peak_flops", "mfu_formula", "memory_method",
    "estimate_method", "checks", "cells", "ift_over_sft", "notes", "elapsed_s", "ok", "ray_or_mlflow_imported",
)  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_without_a_gpu_it_exits_2_with_one_line_saying_what_to_run_instead():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check"],
        cwd=ROOT,
        env=_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == NO_GPU_MESSAGE and proc.stdout == ""
    assert "CUDA GPU" in NO_GPU_MESSAGE and "make bench" in NO_GPU_MESSAGE


def test_the_deepspeed_range_it_names_is_pyprojects():
    assert f'"{DEEPSPEED_SPEC}"' in (ROOT / "pyproject.toml").read_text()


def _blocking(tmp_path: Path, *names: str) -> str:
    """A directory of packages ``names`` whose import fails, to put first on PYTHONPATH."""
    blocked = tmp_path / "blocked"
    for name in names:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ImportError('{name} is blocked: gpu-check must not need it')\n"
        )
    return str(blocked)


@pytest.mark.slow
def test_smoke_run_on_cpu_writes_every_figure_and_both_equality_checks_hold(tmp_path):
    """With Ray and MLflow unimportable (DeepSpeed imports mlflow where it can, and copes without)."""
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([_blocking(tmp_path, "ray", "mlflow"), env["PYTHONPATH"]])
    out = tmp_path / "out"
    proc = subprocess.run(
        # No budget cut on a loaded machine: every cell must run.
        [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--smoke",
            "--out",
            str(out),
            "--peak-tflops",
            "1",
            "--budget-s",
            "3600",
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert set(TOP_KEYS) <= set(doc)
    assert doc["ok"] is True and doc["backend"] == "gloo" and doc["settings"]["smoke"] is True
    assert doc["ray_or_mlflow_imported"] == []

    assert set(doc["cells"]) == CELLS
    for key, cell in doc["cells"].items():
        assert "error" not in cell, (key, cell.get("error"))
        for figure in CELL_FIGURES:
            assert _finite(cell[figure]), (key, figure, cell[figure])
        assert len(cell["step_times_s"]) == 2 and all(_finite(t) for t in cell["step_times_s"])
        assert cell["estimate_parts_bytes"] and all(_finite(v) for v in cell["estimate_parts_bytes"].values())
    # DPO trains on chosen + rejected: twice the tokens of SFT per step, and 16·N·T vs 6·N·T model FLOPs.
    cells = doc["cells"]
    assert cells["zero2/sdpa/dpo"]["tokens_per_step_per_gpu"] == 2 * cells["zero2/sdpa/sft"]["tokens_per_step_per_gpu"]
    assert cells["zero2/sdpa/dpo"]["flops_per_step_per_gpu"] == pytest.approx(
        16 / 6 * cells["zero2/sdpa/sft"]["flops_per_step_per_gpu"]
    )
    assert _finite(doc["ift_over_sft"]["zero2/sdpa"])

    packed, ckpt = doc["checks"]["packed_vs_padded"], doc["checks"]["checkpointing"]
    assert packed["ok"] and packed["packed_shape"][0] < packed["padded_shape"][0]  # really packed: fewer rows
    assert abs(packed["packed_loss"] - packed["padded_loss"]) <= 1e-4 + 1e-4 * abs(packed["padded_loss"])
    assert ckpt["ok"] and ckpt["checkpointing_active"] and ckpt["parameters_compared"] > 0
    assert abs(ckpt["loss_on"] - ckpt["loss_off"]) <= 1e-5 + 1e-5 * abs(ckpt["loss_off"])

    summary = (out / "results.md").read_text()
    assert "Overall: OK." in summary and "zero2/sdpa/ift" in summary and "Smoke run on CPU" in summary
