"""Smoke tests of the benchmark runner: it runs and writes the fields the README table needs.

No timing assertions: benchmarks are measured with ``make bench``, not tested.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("sft", "ift", "ift_detached", "dpo", "orpo")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def test_quick_run_writes_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "scan,step", "--out", str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())

    machine = doc["machine"]
    for key in ("cpu_model", "cpu_cores", "date_utc", "load_average_start", "load_average_end", "versions"):
        assert key in machine
    assert {"torch", "ray", "deepspeed"} <= set(machine["versions"])
    assert doc["quick"] is True

    step = doc["results"]["step"]
    assert "error" not in step, step.get("error")
    assert set(step["methods"]) == set(METHODS)
    for name, entry in step["methods"].items():
        for key in (
            "median_s",
            "ratio_to_sft",
            "theory_ratio_to_sft",
            "tokens_per_s",
            "examples_per_s",
            "peak_mem_bytes",
            "peak_mem_ratio_to_sft",
        ):
            assert entry.get(key) is not None, (name, key, entry)
        assert "memory_error" not in entry, entry["memory_error"]
    assert step["methods"]["sft"]["ratio_to_sft"] == pytest.approx(1.0)
    # Pairs double the tokens per example.
    assert step["methods"]["dpo"]["tokens_per_step"] == 2 * step["methods"]["sft"]["tokens_per_step"]
    assert step["memory_method"]

    scan = doc["results"]["scan"]
    assert set(scan["lengths"]) == {"512", "2048", "8192"}
    for entry in scan["lengths"].values():
        assert entry["scan"]["median_s"] > 0 and entry["loop"]["median_s"] > 0
        assert entry["scan"]["max_rel_err"] < 1e-4
        assert ("median_s" in entry["kernel"]) == scan["kernel_available"]

    labels = {t["label"]: t for t in doc["targets"]}
    assert set(labels) == {
        "IFT step time", "IFT peak memory", "IFT packed padding", "IFT packed useful tokens/s",
        "ZeRO-3 peak RSS per worker", "IFT/SFT step time under ZeRO-3", "Driver reads of a 2M-row corpus",
        "First step, 2M rows",
    }  # fmt: skip
    assert all(labels[k]["status"] in ("met", "missed") for k in ("IFT step time", "IFT peak memory"))
    assert all(labels[k]["status"] == "not measured" for k in ("IFT packed padding", "IFT packed useful tokens/s"))

    md = (tmp_path / "results.md").read_text()
    assert "| ift |" in md and "## Targets" in md and machine["cpu_model"] in md
    # The runner names every target in its output, missed or met.
    assert "IFT step time" in proc.stdout and "IFT peak memory" in proc.stdout


def test_gpu_path_and_scan_do_not_import_ray():
    code = (
        "import sys, benchmarks.run, benchmarks.step_time, benchmarks.scan, benchmarks.common\n"
        "import pipelines.training.loop\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.strip() == "", f"benchmarks' GPU path pulled in: {out.stdout.strip()}"


def test_scan_skips_the_kernel_when_absent(monkeypatch):
    import benchmarks.scan as scan

    monkeypatch.setattr(scan, "kernel_available", lambda: False)
    out = scan.run(lengths=(64,), rows=2, rounds=1, log=lambda _: None)
    entry = out["lengths"]["64"]
    assert out["kernel_available"] is False
    assert "skipped" in entry["kernel"] and entry["kernel_over_scan"] is None


def test_missed_targets_are_printed():
    from benchmarks.run import evaluate_targets, target_lines

    results = {"step": {"methods": {"ift": {"ratio_to_sft": 1.41, "peak_mem_ratio_to_sft": 1.02}}}}
    lines = target_lines(evaluate_targets(results))
    assert "MISSED: IFT step time 1.41x SFT (goal <= 1.35x SFT)" in lines
    assert any(line.startswith("met:") and "IFT peak memory" in line for line in lines)
    assert all(t["status"] == "not measured" for t in evaluate_targets({}))


def rendered(section: str, result: dict, targets: list | None = None) -> str:
    """``results.md`` of a run that measured only ``section`` (a made-up machine)."""
    from benchmarks.run import render_markdown

    machine = {"cpu_model": "x", "cpu_cores": 2, "date_utc": "d", "versions": {}}
    return render_markdown({"machine": machine, "results": {section: result}, "targets": targets or [],
                            "quick": False, "section_seconds": {}})  # fmt: skip


def test_the_stream_section_renders_its_figures_against_their_goals():
    stream = {
        "small_rows": 2000, "large_rows": 200000, "first_step_ratio_large_to_small": 1.1,
        "small": {"seconds_to_first_step": 30.0, "object_store_peak_bytes": 2**20},
        "large": {"seconds_to_first_step": 33.0, "object_store_peak_bytes": 2**21},
        "rows_per_rank": {"rows": 2000, "workers": 2, "rows_read_per_rank": [1000, 1000], "goal_per_rank": 1000.0},
        "tokens_per_s": {
            "materialized": {"tokens_per_s": 1000.0},
            "stream": {"tokens_per_s": 980.0, "ratio_to_materialized": 0.98},
            "cache": {"tokens_per_s": 1010.0, "ratio_to_materialized": 1.01},
        },
    }  # fmt: skip
    md = rendered("stream", stream)
    assert "| time to the first step, 200,000 rows | 33.0 s (1.10x) | within 1.2x |" in md
    assert "| rows read per rank (2,000 rows, 2 workers) | 1,000, 1,000 | 1,000 |" in md
    assert "(0.98x) | >= 0.95x materialized |" in md


def test_the_packing_section_renders_padding_throughput_and_the_trl_peer():
    from benchmarks.run import evaluate_targets, target_lines

    def row(pad, packed_pad, tps, packed_tps):
        return {
            "padded": {"padding_fraction": pad, "tokens_per_s": tps},
            "packed": {"padding_fraction": packed_pad, "tokens_per_s": packed_tps},
            "packed_over_padded": packed_tps / tps,
        }

    pack = {
        "config": {"model": "tiny", "examples": 1024, "batch_size": 8, "pack_length": 512, "rounds": 3,
                   "window": 256, "threads": 1,
                   "lengths": {"log_median": 5.0, "sigma": 0.8, "min_tokens": 16, "max_tokens": 512}},
        "corpus": {"sft": {"p50": 150, "p90": 420, "max": 512}},
        "methods": {"sft": row(0.5, 0.02, 1000.0, 2000.0), "ift": row(0.5, 0.02, 800.0, 1200.0)},
        "trl": {"sft": {"trl_version": "1.16.0", "padding_free": True, "padding_fraction": 0.0,
                        "tokens_per_s": 1600.0}},
    }  # fmt: skip
    targets = evaluate_targets({"pack": pack})
    md = rendered("pack", pack, targets)
    assert "| ift | 50.0% | 2.0% | 800 | 1,200 | 1.50x |" in md
    assert "| TRL 1.16.0 sft | padding-free | 0.0% | 1,600 | 1.25x |" in md
    lines = target_lines(targets)
    assert "met:    IFT packed padding 2.0% (goal <= 5.0%)" in lines
    assert "met:    IFT packed useful tokens/s 1.50x padded (goal >= 1.30x padded)" in lines


def test_the_memory_section_renders_each_allocator_and_stage_and_reads_the_live_memory_ratio_as_its_target():
    from benchmarks.run import evaluate_targets

    def cell(allocator, zero, rss):
        return {"allocator": allocator, "zero_stage": zero, "peak_rss_mib_per_worker": rss,
                "model_states_mib_per_worker": 1584 // (1 + (zero == 3)), "wall_s": 50.0}  # fmt: skip

    memory = {
        "model": "tiny-100m", "workers": 2, "steps": 2,
        "cells": {"glibc default/z0": cell("glibc default", 0, [2900]),
                  "glibc default/z3": cell("glibc default", 3, [3200]),
                  "mmap threshold 128 KiB/z0": cell("mmap threshold 128 KiB", 0, [2600]),
                  "mmap threshold 128 KiB/z3": cell("mmap threshold 128 KiB", 3, [1900, 2000])},
        "zero3_over_zero0_peak_rss": {"glibc default": 3200 / 2900, "mmap threshold 128 KiB": 2000 / 2600},
        "methods": {"ift": {"zero3_over_zero0_peak_rss": 2000 / 2600}},
    }  # fmt: skip
    targets = evaluate_targets({"memory": memory})
    md = rendered("memory", memory, targets)
    assert "| mmap threshold 128 KiB | 3 | 1,900 MiB, 2,000 MiB | 792 MiB | 50 s |" in md
    assert "glibc default: 1.10x" in md
    (memory_target,) = [t for t in targets if t["label"] == "ZeRO-3 peak RSS per worker"]
    assert memory_target["status"] == "met" and memory_target["value"] == pytest.approx(0.769, abs=1e-3)


def test_the_report_section_renders_seconds_per_step_for_both_report_policies():
    report = {
        "config": "tiny", "steps": 30, "measured_steps": "5-30", "cpu_cores": 2,
        "cells": {
            "checkpoints_and_evaluations": {"seconds_per_step": 0.08, "wall_s": 30.0},
            "every_logged_step": {"seconds_per_step": 2.0, "wall_s": 88.0},
        },
        "slowdown_every_logged_step": 25.0,
    }  # fmt: skip
    md = rendered("report", report)
    assert "| checkpoints and evaluations (default) | 0.080 | 30 |" in md
    assert "| every logged step | 2.000 | 88 |" in md
    assert "25.0x slower" in md
