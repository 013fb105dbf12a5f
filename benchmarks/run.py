"""Run the benchmarks, write ``results.json`` and ``results.md``, print the targets a run misses.

    python -m benchmarks.run                      # everything, full sizes (make bench)
    python -m benchmarks.run --quick              # small sizes: a smoke run, not figures to quote
    python -m benchmarks.run --only step,scan     # some sections
    python -m benchmarks.run --only step --model tiny-100m --dtype bf16 --engine deepspeed --zero 2   # GPU

Sections: ``step`` (step time and peak memory per method), ``scan`` (the
discounted scan), ``data`` (Ray Data vs datasets tokenization), ``stream``
(training from a stream: first step, rows per rank, object store, tokens/s),
``pack`` (padding and useful tokens/s, padded vs packed, TRL as the peer),
``lora`` (IFT with LoRA vs full fine-tuning: step time and peak memory, tiny-100m),
``scaling`` (pipeline tokens/s, 1 vs 2 workers x ZeRO 0/2/3), ``memory`` (host memory per
worker, ZeRO-0 vs ZeRO-3), ``report`` (seconds per step, reporting every logged step to Ray
Train vs only checkpoints and evaluations), ``zero3`` (IFT ÷ SFT step time under ZeRO-3 next to
ZeRO-0 on 2 gloo workers, and what ZeRO-3's prefetcher counted), ``driver`` (bytes the driver reads
of a 2M-row corpus before training and the time to the first step, 2M vs 2,000 rows, local and S3).
``step``, ``scan``, ``pack``, ``lora`` and ``zero3`` never import Ray.  Each run overwrites
``<out>/results.json`` and ``<out>/results.md`` with the sections it ran: every ratio in a file
was measured side by side in that one run.  Exit status 0 even when a target is missed (benchmarks are not
tests) unless ``--fail-on-miss``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import fmt_bytes, fmt_ratio, load_average, load_note, machine_info

SECTIONS = ("step", "scan", "data", "stream", "pack", "lora", "scaling", "memory", "report", "zero3", "driver")


@dataclass(frozen=True)
class Target:
    """A goal on one figure: ``results[section]["methods"][method][*key]`` compared to ``limit``."""

    section: str
    method: str
    key: tuple[str, ...]
    limit: float
    label: str
    at_most: bool = True  # value <= limit; else value >= limit
    unit: str = "x SFT"  # how the value reads: "x SFT", "x padded", "%"

    def fmt(self, x: float) -> str:
        return f"{100 * x:.1f}%" if self.unit == "%" else f"{x:.2f}{self.unit}"


TARGETS = (
    Target("step", "ift", ("ratio_to_sft",), 1.35, "IFT step time"),
    Target("step", "ift", ("peak_mem_ratio_to_sft",), 1.10, "IFT peak memory"),
    Target("pack", "ift", ("packed", "padding_fraction"), 0.05, "IFT packed padding", unit="%"),
    Target("pack", "ift", ("packed_over_padded",), 1.30, "IFT packed useful tokens/s", at_most=False, unit="x padded"),
    Target("memory", "ift", ("zero3_over_zero0_peak_rss",), 0.80, "ZeRO-3 peak RSS per worker", unit="x ZeRO-0"),
    Target("zero3", "ift", ("zero3_over_zero0",), 1.10, "IFT/SFT step time under ZeRO-3", unit="x ZeRO-0's"),
    Target("driver", "ift", ("warm_driver_read_fraction_large",), 0.01, "Driver reads of a 2M-row corpus", unit="%"),
    Target("driver", "ift", ("first_step_ratio_large_to_small",), 1.20, "First step, 2M rows", unit="x 2,000 rows"),
)

FULL = {
    "step": {"batch_size": 8, "seq_len": 256, "warmup": 3, "steps": 60, "memory_steps": 2, "memory_repeats": 3},
    "scan": {"rows": 64, "rounds": 15},
    "data": {"n_rows": 50_000, "procs": (2,)},
    "stream": {"small_rows": 2_000, "large_rows": 200_000, "steps": 40, "warmup": 10},
    "pack": {"examples": 1024, "window": 256, "rounds": 3, "warmup_rounds": 1, "trl_steps": 24},
    "lora": {
        "model": "tiny-100m",
        "batch_size": 2,
        "seq_len": 128,
        "warmup": 1,
        "steps": 4,
        "memory_steps": 1,
        "memory_repeats": 1,
    },  # fmt: skip
    "scaling": {"workers": (1, 2), "zero_stages": (0, 2, 3), "steps": 40},
    "memory": {"model": "tiny-100m", "workers": 2, "steps": 2},
    "report": {"steps": 30},
    "zero3": {"model": "tiny", "batch_size": 4, "seq_len": 128, "warmup": 3, "steps": 30},
    "driver": {"small_rows": 2_000, "large_rows": 2_000_000},
}
QUICK = {
    "step": {"batch_size": 2, "seq_len": 64, "warmup": 1, "steps": 3, "memory_steps": 1, "memory_repeats": 1},
    "scan": {"rows": 4, "rounds": 2},
    "data": {"n_rows": 2_000, "procs": (2,)},
    "stream": {"small_rows": 200, "large_rows": 2_000, "steps": 4, "warmup": 1},
    "pack": {"examples": 64, "window": 32, "rounds": 1, "warmup_rounds": 1, "trl_steps": 2, "trl_warmup": 1},
    "lora": {
        "model": "tiny",
        "batch_size": 2,
        "seq_len": 64,
        "warmup": 1,
        "steps": 2,
        "memory_steps": 1,
        "memory_repeats": 1,
    },  # fmt: skip
    "scaling": {"workers": (1, 2), "zero_stages": (0,), "steps": 2},
    "memory": {"model": "tiny", "workers": 2, "steps": 2},
    "report": {"steps": 7},
    "zero3": {"model": "tiny", "batch_size": 2, "seq_len": 32, "warmup": 1, "steps": 2},
    "driver": {"small_rows": 200, "large_rows": 20_000},
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- targets


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        value: Any = results.get(t.section, {}).get("methods", {}).get(t.method, {})
        for k in t.key:
            value = value.get(k) if isinstance(value, dict) else None
        if t.section not in results or value is None or (isinstance(value, float) and math.isnan(value)):
            status = "not measured"
        else:
            status = "met" if (value <= t.limit if t.at_most else value >= t.limit) else "missed"
        goal = f"{'<=' if t.at_most else '>='} {t.fmt(t.limit)}"
        entry = {
            "target": f"{t.label} {goal}",
            "goal": goal,
            "label": t.label,
            "limit": t.limit,
            "value": value,
            "value_text": None if value is None else t.fmt(value),
            "status": status,
        }
        if t.key == ("ratio_to_sft",):
            entry["cpu_time_value"] = (
                results.get(t.section, {}).get("methods", {}).get(t.method, {}).get("cpu_ratio_to_sft")
            )
        out.append(entry)
    return out


def target_lines(targets: list[dict[str, Any]]) -> list[str]:
    lines = []
    for t in targets:
        cpu = t.get("cpu_time_value")
        extra = f" (by CPU time: {cpu:.2f}x)" if cpu is not None else ""
        if t["status"] == "missed":
            lines.append(f"MISSED: {t['label']} {t['value_text']} (goal {t['goal']}){extra}")
        elif t["status"] == "met":
            lines.append(f"met:    {t['label']} {t['value_text']} (goal {t['goal']}){extra}")
        else:
            lines.append(f"not measured: {t['target']} (section not run or failed)")
    return lines


# --------------------------------------------------------------------------- markdown


def _ms(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 1e3:.1f}"


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _mem(e: dict[str, Any]) -> str:
    lo, hi = (e.get("peak_mem_range_bytes") or [None, None])[:2]
    text = fmt_bytes(e.get("peak_mem_bytes"))
    if lo is not None and hi is not None and (e.get("peak_mem_repeats") or 1) > 1:
        text += f" ({fmt_bytes(lo)}–{fmt_bytes(hi)})"
    return text


def render_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    r = doc["results"]
    v = m["versions"]
    lines = ["# IFT benchmark results", ""]
    if doc.get("quick"):
        lines += ["**Quick smoke run** (`--quick`): sizes far below the benchmark's; not figures to quote.", ""]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    lines += [
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m.get('memory_gib')} GiB{gpu}; "
        f"torch {v.get('torch')}, transformers {v.get('transformers')}, ray {v.get('ray')}, "
        f"deepspeed {v.get('deepspeed')}, datasets {v.get('datasets')}, "
        f"torch-discounted-cumsum {v.get('torch-discounted-cumsum') or 'not installed'}.  "
        f"Date {m['date_utc']} UTC, commit {m.get('git_commit')}.  "
        f"Load average (1, 5, 15 min) {m.get('load_average_start')} at the start, "
        f"{m.get('load_average_end')} at the end.",
        "",
    ]
    if doc.get("load_note"):
        lines += [f"> **Noisy:** {doc['load_note']}.", ""]

    if "step" in r:
        lines += render_step(r["step"], "## 1. Training step time and peak memory")
    if "scan" in r:
        s = r["scan"]
        lines += ["## 2. Discounted scan (CPU, float32)", ""]
        if "error" in s:
            lines += [f"Failed: `{s['error'][:300]}`", ""]
        else:
            lines += [
                f"{s['rows']} rows x K, γ = {s['gamma']}, {s['torch_threads']} thread(s), median of {s['rounds']} "
                "interleaved rounds.  `scan` = `ift.scan.discounted_cumsum` (backend torch); `loop` = float32 "
                "reverse loop; `kernel` = torch-discounted-cumsum with a 1-D γ"
                + ("" if s["kernel_available"] else " (**skipped: not installed**)")
                + ".  Errors: max |y − y_float64|.",
                "",
                "| K | scan, ms | loop, ms | loop / scan | kernel, ms | kernel / scan "
                "| err scan | err loop | err kernel |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for k, e in s["lengths"].items():
                kern = e.get("kernel", {})
                lines.append(
                    f"| {k} | {_ms(e['scan']['median_s'])} | {_ms(e['loop']['median_s'])} "
                    f"| {e['loop_over_scan']:.1f}x | {_ms(kern.get('median_s'))} "
                    f"| {fmt_ratio(e.get('kernel_over_scan'))} | {e['scan']['max_abs_err']:.1e} "
                    f"| {e['loop']['max_abs_err']:.1e} | "
                    + (f"{kern['max_abs_err']:.1e}" if "max_abs_err" in kern else "n/a")
                    + " |"
                )
            lines.append("")
    if "data" in r:
        s = r["data"]
        lines += ["## 3. Data path: tokenization", ""]
        if "error" in s:
            lines += [f"Failed: `{s['error'][:300]}`", ""]
        else:
            lines += [
                f"{s['rows']:,} generated conversations (in memory), tokenizer `{s['tokenizer']}`, max_length "
                f"{s['max_length']}, batches of {s['batch_size']}; both sides run "
                "`pipelines.data.tokenize.TokenizeRows`.  "
                "End to end includes worker start (Ray actors / the datasets process pool); steady = worker "
                f"start excluded (full run minus a one-batch-per-worker run).  ray.init ({s['ray_init_s']:.1f} s) "
                f"excluded.  Load average before/after: {s.get('load_average_before')} / "
                f"{s.get('load_average_after')}.",
                "",
                "| processes | library | rows/s end to end | tokens/s end to end | rows/s steady "
                "| tokens/s steady | seconds |",
                "|---|---|---|---|---|---|---|",
            ]
            for p, e in s["procs"].items():
                for lib, label in (("ray_data", "Ray Data map_batches"), ("datasets", "datasets.map")):
                    x = e[lib]
                    lines.append(
                        f"| {p} | {label} | {_num(x['rows_per_s'])} | {_num(x['tokens_per_s'])} "
                        f"| {_num(x['steady_rows_per_s'])} | {_num(x['steady_tokens_per_s'])} | {x['seconds']:.1f} |"
                    )
                steady = e.get("ray_over_datasets_steady")
                lines.append(
                    f"| {p} | Ray / datasets | {fmt_ratio(e['ray_over_datasets_rows_per_s'])} | | "
                    f"{fmt_ratio(steady)} | | tokens equal: {e['tokens_match']} |"
                )
            lines.append("")
    if "stream" in r:
        s = r["stream"]
        lines += ["## 4. Training from a stream", ""]
        if "error" in s:
            lines += [f"Failed: `{s['error'][:300]}`", ""]
        else:
            rpr, tps = s["rows_per_rank"], s["tokens_per_s"]
            lines += [
                "`ift train` (tiny, 2 workers) on generated chat corpora; see `benchmarks/streaming.py`.",
                "",
                "| figure | measured | goal |",
                "|---|---|---|",
                f"| time to the first step, {s['small_rows']:,} rows | {s['small']['seconds_to_first_step']:.1f} s | |",
                f"| time to the first step, {s['large_rows']:,} rows | {s['large']['seconds_to_first_step']:.1f} s "
                f"({s['first_step_ratio_large_to_small']:.2f}x) | within 1.2x |",
                f"| rows read per rank ({rpr['rows']:,} rows, {rpr['workers']} workers) | "
                f"{', '.join(f'{n:,}' for n in rpr['rows_read_per_rank'])} | {rpr['goal_per_rank']:,.0f} |",
                f"| object-store peak, {s['small_rows']:,} / {s['large_rows']:,} rows | "
                f"{fmt_bytes(s['small']['object_store_peak_bytes'])} / "
                f"{fmt_bytes(s['large']['object_store_peak_bytes'])} | bounded, independent of corpus size |",
                f"| steady tokens/s, materialized | {_num(tps['materialized']['tokens_per_s'])} | |",
                f"| steady tokens/s, streamed | {_num(tps['stream']['tokens_per_s'])} "
                f"({fmt_ratio(tps['stream']['ratio_to_materialized'])}) | >= 0.95x materialized |",
                f"| steady tokens/s, from the cache | {_num(tps['cache']['tokens_per_s'])} "
                f"({fmt_ratio(tps['cache']['ratio_to_materialized'])}) | >= 0.95x materialized |",
                "",
            ]
    if "pack" in r:
        lines += render_packing(r["pack"])
    if "lora" in r:
        lines += render_step(r["lora"], "## 5b. LoRA vs full fine-tuning (IFT)")
    if "scaling" in r:
        s = r["scaling"]
        lines += ["## 6. Scaling: pipeline tokens/s", ""]
        if "error" in s:
            lines += [f"Failed: `{s['error'][:300]}`", ""]
        else:
            lines += [
                f"`ift train` ({s['config']}), {s['method']}, {s['steps']} optimizer steps, tokens/s of steps "
                f"{s['measured_steps']} from the run's own metric; {s['cpu_cores']} cores.  Load average "
                f"before/after: {s.get('load_average_before')} / {s.get('load_average_after')}.",
                "",
                "| ZeRO | 1 worker, tokens/s | 2 workers, tokens/s | 2 / 1 | efficiency |",
                "|---|---|---|---|---|",
            ]
            zeros = sorted({c["zero_stage"] for c in s["cells"].values()})
            for z in zeros:
                one = s["cells"].get(f"w1_z{z}", {})
                two = s["cells"].get(f"w2_z{z}", {})
                bz = s["by_zero_stage"].get(str(z), {})
                eff = "n/a" if bz.get("efficiency") is None else f"{100 * bz['efficiency']:.0f}%"
                lines.append(
                    f"| {z} | {_num(one.get('tokens_per_s')) if 'error' not in one else 'failed'} "
                    f"| {_num(two.get('tokens_per_s')) if 'error' not in two else 'failed'} "
                    f"| {fmt_ratio(bz.get('speedup_2_over_1'))} "
                    f"| {eff} |"
                )
            lines.append("")
    if "memory" in r:
        lines += render_memory(r["memory"])
    if "report" in r:
        from benchmarks.report_overhead import render as render_report

        lines += render_report(r["report"])
    if "zero3" in r:
        from benchmarks.zero3_passes import render as render_zero3

        lines += render_zero3(r["zero3"])
    if "driver" in r and "error" not in r["driver"]:
        from benchmarks.driver_reads import render as render_driver

        lines += render_driver(r["driver"])
    lines += ["## Targets", "", "| target | measured | result |", "|---|---|---|"]
    for t in doc["targets"]:
        val = t.get("value_text") or ("n/a" if t["value"] is None else f"{t['value']:.2f}x")
        if t.get("cpu_time_value") is not None:
            val += f" (CPU time: {t['cpu_time_value']:.2f}x)"
        lines.append(f"| {t['target']} | {val} | {t['status']} |")
    lines.append("")
    return "\n".join(lines)


def render_memory(m: dict[str, Any]) -> list[str]:
    lines = ["## 7. Host memory per worker: ZeRO-0 vs ZeRO-3", ""]
    if "error" in m:
        return [*lines, f"Failed: `{m['error'][:300]}`", ""]
    lines += [
        f"`ift train` of `{m['model']}` (IFT, {m['workers']} workers, {m['steps']} steps, final checkpoint and "
        "export included), peak RSS of each `ray::RayTrainWorker` process sampled every 50 ms from outside; "
        "model states as the ZeRO paper counts them for the stage (`pipelines.training.estimate`).",
        "",
        "| allocator | ZeRO | peak RSS per worker | model states per worker | wall |",
        "|---|---|---|---|---|",
    ]
    for cell in m["cells"].values():
        rss = ", ".join(f"{v:,} MiB" for v in cell["peak_rss_mib_per_worker"]) or "none sampled"
        lines.append(
            f"| {cell['allocator']} | {cell['zero_stage']} | {rss}{' (failed)' if 'error' in cell else ''} "
            f"| {cell['model_states_mib_per_worker']:,} MiB | {cell['wall_s']:.0f} s |"
        )
    buffers = next((c["deepspeed_buffers"] for c in m["cells"].values() if "deepspeed_buffers" in c), None)
    if buffers:
        lines += ["", "DeepSpeed's ZeRO-3 buffers as configured (elements): "
                  + ", ".join(f"`{k}` {v:,}" for k, v in buffers.items()) + "."]  # fmt: skip
    for allocator, ratio in m.get("zero3_over_zero0_peak_rss", {}).items():
        lines += ["", f"ZeRO-3 / ZeRO-0 peak RSS per worker, {allocator}: {fmt_ratio(ratio)}."]
    return [*lines, ""]


def render_step(s: dict[str, Any], title: str) -> list[str]:
    lines: list[str] = []
    c = s.get("config", {})
    if "error" in s:
        lines += [title, "", f"Failed: `{s['error'][:300]}`", ""]
    else:
        engine = c["engine"] + (f" ZeRO-{c['zero_stage']}" if c["engine"] == "deepspeed" else "")
        lines += [
            title,
            "",
            f"Model `{c['model']}` ({s['model_params'] / 1e6:.2f}M parameters) on {s['device_name']} "
            f"({s['device']}, {s.get('torch_threads')} thread(s)), {c['dtype']}, engine {engine}; batch "
            f"{c['batch_size']} x {c['seq_len']} tokens (no padding); {c['steps']} timed rounds after "
            f"{c['warmup']} warm-up rounds, methods interleaved.  Step = forward(s) + backward + clip + "
            "optimizer step.  DPO/ORPO train on chosen + rejected of the same lengths: 2x the tokens per "
            "example.  Load average before/after: "
            f"{s.get('load_average_before')} / {s.get('load_average_after')}.",
            "",
            "| method | step time, ms (p25–p75) | x SFT | x SFT, CPU time | theory x SFT | tokens/s "
            "| examples/s | peak memory of the step (range) | x SFT | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, e in s["methods"].items():
            mfu = "n/a" if e.get("mfu") is None else f"{100 * e['mfu']:.1f}%"
            lines.append(
                f"| {name} | {_ms(e['median_s'])} ({_ms(e['p25_s'])}–{_ms(e['p75_s'])}) "
                f"| {fmt_ratio(e['ratio_to_sft'])} | {fmt_ratio(e.get('cpu_ratio_to_sft'))} "
                f"| {fmt_ratio(e['theory_ratio_to_sft'])} "
                f"| {_num(e['tokens_per_s'])} | {_num(e['examples_per_s'], '{:,.1f}')} "
                f"| {_mem(e)} | {fmt_ratio(e.get('peak_mem_ratio_to_sft'))} | {mfu} |"
            )
        lines += [
            "",
            "x SFT (time) is the median of per-round paired ratios of wall-clock step times; the CPU-time "
            "column is the same with the process's CPU time per step (on CPU with one thread: the work done, "
            "without the time spent waiting for a core other jobs held).  "
            f"  Peak memory: {s.get('memory_method')}; "
            f"median (range) over {c.get('memory_repeats', 1)} fresh process(es) per method.  Theory "
            "counts forward-pass equivalents (backward = 2 forwards) and ignores the optimizer step.",
            "",
        ]
    return lines


def render_packing(s: dict[str, Any]) -> list[str]:
    lines = ["## 5. Packing: padded vs packed micro-batches, and TRL", ""]
    if "error" in s:
        return lines + [f"Failed: `{s['error'][:300]}`", ""]
    c, lm, corpus = s["config"], s["config"]["lengths"], s["corpus"]["sft"]
    lines += [
        f"{c['model']}, {c['examples']:,} generated examples with lognormal lengths (median e^{lm['log_median']}, "
        f"σ {lm['sigma']}, clipped {lm['min_tokens']}–{lm['max_tokens']}: p50 {corpus['p50']}, p90 {corpus['p90']}, "
        f"max {corpus['max']}); {c['batch_size']} rows per micro-batch, padded to the longest or packed into rows "
        f"of {c['pack_length']} tokens (pairs {2 * c['pack_length']}); {c['rounds']} timed rounds of "
        f"{c['window']} examples, {c['threads']} thread(s); see `benchmarks/packing.py`.",
        "",
        "| method | padding, padded | padding, packed | useful tokens/s, padded | useful tokens/s, packed "
        "| packed / padded |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in s["methods"].items():
        pad, pk = row["padded"], row["packed"]
        lines.append(
            f"| {method} | {100 * pad['padding_fraction']:.1f}% | {100 * pk['padding_fraction']:.1f}% "
            f"| {_num(pad['tokens_per_s'])} | {_num(pk['tokens_per_s'])} | {fmt_ratio(row['packed_over_padded'])} |"
        )
    trl = s.get("trl")
    if trl:
        lines += ["", "The peer, TRL, on the same model, examples, examples per micro-batch and threads:", ""]
        if "error" in trl:
            lines.append(f"TRL not measured: {trl['error']}")
        else:
            lines += [
                "| trainer | layout TRL used | padding | useful tokens/s | ours packed / TRL |",
                "|---|---|---|---|---|",
            ]
            for method, row in trl.items():
                if "error" in row:
                    lines.append(f"| TRL {method} | failed: `{row['error'][:120]}` | | | |")
                    continue
                ours = s["methods"].get(method, {}).get("packed", {}).get("tokens_per_s")
                layout = "padding-free" if row.get("padding_free") else "padded (padding_free ignored)"
                lines.append(
                    f"| TRL {row.get('trl_version', '')} {method} | {layout} | "
                    f"{100 * row.get('padding_fraction', 0.0):.1f}% | {_num(row['tokens_per_s'])} "
                    f"| {fmt_ratio(ours / row['tokens_per_s'] if ours and row['tokens_per_s'] else None)} |"
                )
    return lines + [""]


# --------------------------------------------------------------------------- main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--out", default="benchmarks/results", help="directory for results.json and results.md")
    p.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        default=None,
        help="only rewrite results.md next to an existing results.json and print the targets",
    )
    g = p.add_argument_group("step")
    g.add_argument("--model", default="tiny")
    g.add_argument("--dtype", default="float32", choices=["float32", "bf16"])
    g.add_argument("--engine", default="torch", choices=["torch", "deepspeed"])
    g.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3])
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--seq-len", type=int, default=None)
    g.add_argument("--steps", type=int, default=None, help="timed rounds")
    g.add_argument("--device", default="auto")
    g.add_argument("--peak-tflops", type=float, default=None)
    g = p.add_argument_group("pack (also takes --model, --dtype, --device)")
    g.add_argument("--attn", default=None, help="attention implementation, e.g. flash_attention_2 (GPU)")
    g = p.add_argument_group("data / scaling")
    g.add_argument("--data-rows", type=int, default=None)
    g.add_argument("--procs", default=None, help="processes for the data path, e.g. 1,2")
    g.add_argument("--scaling-steps", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.render:
        path = Path(args.render)
        doc = json.loads(path.read_text())
        (path.parent / "results.md").write_text(render_markdown(doc))
        log(render_markdown(doc))
        for line in target_lines(doc["targets"]):
            log(line)
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    sizes = QUICK if args.quick else FULL
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    machine = machine_info()
    log(
        f"benchmarks: {', '.join(only)}{' (quick)' if args.quick else ''} on {machine['cpu_model']}, "
        f"{machine['cpu_cores']} cores{', ' + machine['gpu'] if machine.get('gpu') else ''}; "
        f"load average {machine['load_average_start']}"
    )
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for section in SECTIONS:
        if section not in only:
            continue
        t0 = time.perf_counter()
        try:
            if section == "step":
                from benchmarks.step_time import StepConfig
                from benchmarks.step_time import run as run_step

                kw = dict(sizes["step"])
                for key, val in (("batch_size", args.batch_size), ("seq_len", args.seq_len), ("steps", args.steps)):
                    if val is not None:
                        kw[key] = val
                cfg = StepConfig(
                    model=args.model,
                    dtype=args.dtype,
                    engine=args.engine,
                    zero_stage=args.zero,
                    device=args.device,
                    peak_tflops=args.peak_tflops,
                    **kw,
                )
                results["step"] = run_step(cfg, log=log)
            elif section == "scan":
                from benchmarks.scan import run as run_scan

                results["scan"] = run_scan(log=log, **sizes["scan"])
            elif section == "data":
                from benchmarks.data_path import run as run_data

                kw = dict(sizes["data"])
                if args.data_rows:
                    kw["n_rows"] = args.data_rows
                if args.procs:
                    kw["procs"] = tuple(int(x) for x in args.procs.split(","))
                results["data"] = run_data(log=log, **kw)
            elif section == "stream":
                from benchmarks.streaming import run as run_stream

                results["stream"] = run_stream(log=log, **sizes["stream"])
            elif section == "pack":
                from benchmarks.packing import run as run_packing

                kw = dict(sizes["pack"], model=args.model, device=args.device, dtype=args.dtype)
                results["pack"] = run_packing(log=log, attn_implementation=args.attn, **kw)
            elif section == "lora":
                from benchmarks.step_time import StepConfig
                from benchmarks.step_time import run as run_step

                cfg = StepConfig(methods=("sft", "ift", "ift_lora"), device=args.device, **sizes["lora"])
                results["lora"] = run_step(cfg, log=log)
            elif section == "scaling":
                from benchmarks.scaling import run as run_scaling

                kw = dict(sizes["scaling"])
                if args.scaling_steps:
                    kw["steps"] = args.scaling_steps
                results["scaling"] = run_scaling(log=log, **kw)
            elif section == "memory":
                from benchmarks.zero_memory import run as run_memory

                results["memory"] = run_memory(log=log, **sizes["memory"])
            elif section == "report":
                from benchmarks.report_overhead import run as run_report

                results["report"] = run_report(log=log, **sizes["report"])
            elif section == "zero3":
                from benchmarks.zero3_passes import run as run_zero3

                results["zero3"] = run_zero3(log=log, **sizes["zero3"])
            elif section == "driver":
                from benchmarks.driver_reads import run as run_driver

                results["driver"] = run_driver(log=log, **sizes["driver"])
        except Exception as exc:  # report the section as failed, keep the others
            import traceback

            traceback.print_exc()
            results[section] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"[{section}] FAILED: {type(exc).__name__}: {exc}")
        timings[section] = time.perf_counter() - t0

    machine["load_average_end"] = load_average()
    loads = [machine["load_average_start"], machine["load_average_end"]]
    for sec in results.values():
        loads += [sec.get("load_average_before"), sec.get("load_average_after")]
        for cell in (sec.get("cells") or {}).values():
            loads.append(cell.get("load_average"))
    targets = evaluate_targets(results)
    doc = {
        "quick": args.quick,
        "sections": only,
        "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "load_note": load_note(loads, machine["cpu_cores"]),
        "section_seconds": timings,
        "results": results,
        "targets": targets,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "results.md").write_text(render_markdown(doc))
    log("")
    log(render_markdown(doc))
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    if doc["load_note"]:
        log(f"NOTE: {doc['load_note']}")
    for line in target_lines(targets):
        log(line)
    missed = [t for t in targets if t["status"] == "missed"]
    return 1 if (missed and args.fail_on_miss) else 0


if __name__ == "__main__":
    sys.exit(main())
