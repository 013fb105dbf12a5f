"""Training step time and peak memory per method, side by side on one model and one batch.

A *step* is what the training loop does per micro-batch: the method's forward
pass(es), the backward pass and the optimizer step (with gradient clipping at
1.0, as ``pipelines.training.loop`` does).  Every method starts from a copy of the same
initial weights and sees the same batch:

* ``sft``           ``ift.objectives.sft_loss``: one forward with gradients;
* ``ift``           ``ift.objectives.ift_loss`` (λ=0.2, γ=0.95): one no-grad
                    forward (the model's own predictions), one forward with
                    gradients on the fused embeddings, the discounted scan;
* ``ift_detached``  the same with ``detach_weights=True``;
* ``dpo``           ``dpo_batch_loss`` with a frozen reference model (a copy of
                    the start weights) run under no-grad;
* ``orpo``          ``orpo_batch_loss``.

DPO and ORPO train on (chosen, rejected) pairs: their batch is the SFT batch as
``chosen`` plus a ``rejected`` twin of the same lengths (response tokens
replaced by random ones), so a pair method processes **twice the tokens per
example** of SFT/IFT.  Their step-time ratios are per example, not per token.

Timing: every method runs one step per round, in a rotating order, for
``warmup + steps`` rounds; the first ``warmup`` rounds are dropped.  The step
time is the median over rounds; the ratio to SFT is the median of the per-round
ratios (paired, so a load spike on a shared machine hits both sides).

Peak memory is measured in a fresh process per method (so one method's
allocator caches cannot hide another's peak):

* CUDA: ``torch.cuda.max_memory_allocated`` after the steps, minus the memory
  allocated once the model and batch are on the device;
* CPU: the process's peak resident set (``VmHWM`` in ``/proc/self/status``,
  reset through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is not
  possible) after the steps, minus the resident set once the model and the batch
  are built.

Both count what a step adds on top of the loaded model: gradients, optimizer
state, activations, temporaries and a method's own state (DPO's reference
model).  The absolute peaks are recorded too.

This module never imports Ray: on a GPU machine it drives ``ift`` and DeepSpeed
directly (``--engine deepspeed`` builds the engine with ``pipelines.training.loop``'s
``build_engine``, which has no Ray import either)::

    python -m benchmarks.step_time --model tiny-100m --dtype bf16 --engine deepspeed --zero 2 \\
        --batch-size 8 --seq-len 1024 --steps 20

One module on purpose: the batch, the per-method runner, the interleaved timing and the
fresh-process memory figure are one measurement and are read together.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from benchmarks.common import cpu_model, load_average, summarize

# Benchmarked variants: a name and its `method` config (λ and decay come from StepConfig);
# the objectives themselves come from the method table, pipelines.training.methods.
BENCH_METHODS: dict[str, dict[str, Any]] = {
    "sft": {"name": "sft"},
    "ift": {"name": "ift"},
    "ift_detached": {"name": "ift", "detach_weights": True},
    "dpo": {"name": "dpo"},
    "orpo": {"name": "orpo"},
    # IFT training LoRA adapters (r 16 on the attention and MLP projections) instead of every weight.
    "ift_lora": {"name": "ift", "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0}},
}
METHODS: tuple[str, ...] = tuple(BENCH_METHODS)
DEFAULT_METHODS: tuple[str, ...] = ("sft", "ift", "ift_detached", "dpo", "orpo")  # the step section's

# Forward-pass equivalents per step, in units of one forward over the SFT batch
# (backward ≈ 2 forwards).  IFT: the no-grad pass + forward + backward.  DPO:
# policy forward+backward on 2x the sequences plus the reference forward on 2x.
# IFT with LoRA: the backward computes activation gradients only (the weights are frozen; the
# adapters' gradients are tiny), about one forward, so no-grad pass + forward + backward = 3.
THEORY_FORWARDS: dict[str, int] = {"sft": 3, "ift": 4, "ift_detached": 4, "dpo": 8, "orpo": 6, "ift_lora": 3}

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; pass --peak-tflops for anything else.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


@dataclass
class StepConfig:
    model: str = "tiny"
    dtype: str = "float32"  # float32 | bf16 (torch engine: autocast; deepspeed: its bf16 mode)
    engine: str = "torch"  # torch (plain AdamW) | deepspeed (pipelines.training.build.build_engine, one process)
    zero_stage: int = 0  # deepspeed only
    batch_size: int = 8
    seq_len: int = 256
    warmup: int = 3
    steps: int = 10
    memory_steps: int = 2
    memory_repeats: int = 3  # fresh processes per method; the figure is their median
    methods: tuple[str, ...] = DEFAULT_METHODS
    lam: float = 0.2
    decay: float = 0.95
    lr: float = 1e-5
    device: str = "auto"
    seed: int = 0
    memory: bool = True
    peak_tflops: float | None = None
    # Intra-op threads on CPU.  None = 1 on CPU: on a shared machine OpenMP threads that spin
    # at barriers make multi-threaded steps 10x slower and far noisier (measured here); on a
    # GPU the setting is left alone.
    threads: int | None = None

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


# --------------------------------------------------------------------------- the batch


def build_batches(tokenizer, batch_size: int, seq_len: int, seed: int) -> tuple[dict, dict]:
    """An SFT batch of exactly ``seq_len`` tokens per row (no padding) and its pair batch.

    Rows are multi-turn chats from ``ift.toydata.make_conversations`` joined until
    they reach ``seq_len`` tokens, tokenized with the chat template (only assistant
    turns are targets) and cut at ``seq_len``.
    """
    from ift.collate import pad_collate
    from ift.data import IGNORE_INDEX, tokenize_conversation
    from ift.toydata import make_conversations

    rows = iter(make_conversations(batch_size * (seq_len // 16 + 8), seed=seed))
    examples = []
    while len(examples) < batch_size:
        messages: list[dict[str, str]] = []
        while True:
            row = next(rows)["messages"]
            messages.extend(m for m in row if m["role"] != "system" or not messages)
            tok = tokenize_conversation(tokenizer, messages, max_length=10**9, truncation="truncate_right")
            if len(tok["input_ids"]) >= seq_len:
                break
        ex = tokenize_conversation(tokenizer, messages, max_length=seq_len, truncation="truncate_right")
        examples.append(ex)
    sft = pad_collate(examples, tokenizer.pad_token_id)
    assert sft["input_ids"].shape == (batch_size, seq_len)

    g = torch.Generator().manual_seed(seed + 1)
    is_target = sft["labels"] != IGNORE_INDEX
    noise = torch.randint(8, len(tokenizer), sft["input_ids"].shape, generator=g)
    rejected_ids = torch.where(is_target, noise, sft["input_ids"])
    pair = {
        "chosen_input_ids": sft["input_ids"],
        "chosen_attention_mask": sft["attention_mask"],
        "chosen_labels": sft["labels"],
        "rejected_input_ids": rejected_ids,
        "rejected_attention_mask": sft["attention_mask"].clone(),
        "rejected_labels": torch.where(is_target, rejected_ids, sft["labels"]),
    }
    return sft, pair


# --------------------------------------------------------------------------- one method


def _init_single_process_dist() -> None:
    """DeepSpeed wants a process group; give it a one-rank one (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        s.close()
    for k, v in (
        ("MASTER_ADDR", "127.0.0.1"),
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("LOCAL_WORLD_SIZE", "1"),
    ):
        os.environ.setdefault(k, v)


def _deepspeed_train_config(cfg: StepConfig):
    from pipelines.config_loading import load_config

    precision = "bf16" if cfg.dtype in ("bf16", "bfloat16") else "fp32"
    return load_config(
        None,
        [
            f"deepspeed.zero_stage={cfg.zero_stage}",
            f"deepspeed.precision={precision}",
            f"optimization.micro_batch_size={cfg.batch_size}",
            "optimization.gradient_accumulation_steps=1",
            f"optimization.lr={cfg.lr}",
            "optimization.warmup_ratio=0",
            "optimization.schedule=constant",
            "mlflow.enabled=false",
        ],
    )


class MethodRunner:
    """One method's model (a copy of the shared start weights), optimizer and step."""

    def __init__(
        self,
        name: str,
        base_model: torch.nn.Module,
        cfg: StepConfig,
        device: torch.device,
        sft_batch: dict,
        pair_batch: dict,
        *,
        copy_model: bool = True,
    ):
        from pydantic import TypeAdapter

        from pipelines.config import METHOD_CONFIGS, MethodConfig
        from pipelines.training.methods import build_objective

        self.name = name
        self.cfg = cfg
        self.device = device
        # The timing run keeps one start copy and gives every method its own; a memory child hands
        # its only copy over, so the measured step memory holds no second set of weights.
        model = (copy.deepcopy(base_model) if copy_model else base_model).to(device).train()
        spec = dict(BENCH_METHODS[name])
        lora = spec.pop("lora", None)
        if lora is not None:
            from ift.lora import add_lora
            from pipelines.config import LoraConfig

            model = add_lora(model, **LoraConfig(**lora).model_dump()).train()
        # λ and decay from StepConfig, for the methods that have them
        options = {
            k: v
            for k, v in {"lam": cfg.lam, "decay": cfg.decay}.items()
            if k in METHOD_CONFIGS[spec["name"]].model_fields
        }
        method_cfg = TypeAdapter(MethodConfig).validate_python({**spec, **options})
        self.objective = build_objective(method_cfg, model, device, seed=cfg.seed)
        self.batch = pair_batch if method_cfg.paired else sft_batch
        mask_keys = (
            ["attention_mask"]
            if "attention_mask" in self.batch
            else ["chosen_attention_mask", "rejected_attention_mask"]
        )
        self.tokens = int(sum(int(self.batch[k].sum()) for k in mask_keys))
        self.examples = int(next(iter(self.batch.values())).shape[0])
        bf16 = cfg.dtype in ("bf16", "bfloat16")
        self.engine = None
        if cfg.engine == "deepspeed":
            from pipelines.training.build import build_engine

            if getattr(self.objective, "reference", None) is not None and bf16:
                self.objective.reference = self.objective.reference.to(torch.bfloat16)
            _init_single_process_dist()
            self.engine = build_engine(
                _deepspeed_train_config(cfg), model, total_steps=10**6, use_gpu=device.type == "cuda"
            )
            self.model = self.engine
            self.autocast = contextlib.nullcontext
        elif cfg.engine == "torch":
            self.model = model
            self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
            self.autocast = (
                (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
            )
        else:
            raise ValueError(f"unknown engine {cfg.engine!r}; expected 'torch' or 'deepspeed'")

    def step(self, batch: dict | None = None) -> None:
        """One micro-batch step on ``batch`` (default: the runner's own batch)."""
        with self.autocast():
            out = self.objective(self.model, self.batch if batch is None else batch, step=0)
        if self.engine is not None:
            self.engine.backward(out.loss)
            self.engine.step()
        else:
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _setup(cfg: StepConfig):
    from ift.models import load_model
    from ift.tokenization import load_tokenizer

    device = torch.device(cfg.resolved_device())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, dtype="float32", seed=cfg.seed, tokenizer=tokenizer)
    sft_batch, pair_batch = build_batches(tokenizer, cfg.batch_size, cfg.seq_len, cfg.seed)
    sft_batch = {k: v.to(device) for k, v in sft_batch.items()}
    pair_batch = {k: v.to(device) for k, v in pair_batch.items()}
    return device, base, sft_batch, pair_batch


# --------------------------------------------------------------------------- memory (one method per process)


def _rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes, from /proc/self/status."""
    text = open("/proc/self/status").read()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024
    hwm = int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) * 1024
    return rss, hwm


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_child(cfg: StepConfig, method: str) -> dict[str, Any]:
    """Runs in a fresh process: peak memory of ``cfg.memory_steps`` steps of ``method``."""
    device, base, sft_batch, pair_batch = _setup(cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = base.to(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner = MethodRunner(method, base, cfg, device, sft_batch, pair_batch, copy_model=False)
        for _ in range(cfg.memory_steps):
            runner.step()
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "method": method,
            "peak_bytes": peak - before,
            "absolute_peak_bytes": peak,
            "baseline_bytes": before,
            "how": "torch.cuda.max_memory_allocated minus memory_allocated with the model and batch on the device",
        }
    import gc
    import resource

    gc.collect()
    baseline, _ = _rss_bytes()
    runner = MethodRunner(method, base, cfg, device, sft_batch, pair_batch, copy_model=False)
    gc.collect()
    reset = _reset_peak_rss()
    for _ in range(cfg.memory_steps):
        runner.step()
    rss, hwm = _rss_bytes()
    if not reset:  # VmHWM then covers the whole process life; ru_maxrss is the same number in KiB
        hwm = max(hwm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    how = (
        "peak RSS (VmHWM, reset via /proc/self/clear_refs after setup) minus RSS with the model and batch built"
        if reset
        else "peak RSS over the process life (ru_maxrss) minus RSS with the model and batch built"
    )
    return {
        "method": method,
        "peak_bytes": hwm - baseline,
        "absolute_peak_bytes": hwm,
        "baseline_bytes": baseline,
        "how": how,
    }


def _memory_task(args: tuple[dict[str, Any], str]) -> dict[str, Any]:
    raw, method = args
    os.environ.pop("MASTER_PORT", None)  # each DeepSpeed child picks its own free port
    raw = dict(raw, methods=tuple(raw["methods"]))
    try:
        return memory_child(StepConfig(**raw), method)
    except Exception as exc:  # reported in the results, the other methods still count
        return {"method": method, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def measure_memory(cfg: StepConfig, *, parallel: int = 1) -> dict[str, dict[str, Any]]:
    """One fresh process per method (``maxtasksperchild=1``), ``parallel`` at a time.

    The processes come from a fork server that has imported torch, transformers
    and ``ift`` once, so a child costs a model build rather than a Python start
    with all the imports (CPU: each child's RSS is its own, so running two at a
    time does not change the figures; CUDA: one at a time).
    """
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    # Not this module itself: run as ``python -m benchmarks.step_time`` it is the children's __main__.
    preload = ["torch", "transformers", "ift.models", "ift.objectives", "ift.data", "ift.toydata"]
    if cfg.engine == "deepspeed":
        preload.append("pipelines.training.loop")
    ctx.set_forkserver_preload(preload)
    raw = asdict(cfg)
    tasks = [(raw, m) for _ in range(max(1, cfg.memory_repeats)) for m in cfg.methods]
    with ctx.Pool(processes=max(1, parallel), maxtasksperchild=1) as pool:
        runs = pool.map(_memory_task, tasks, chunksize=1)
    out: dict[str, dict[str, Any]] = {}
    for m in cfg.methods:
        mine = [r for r in runs if r["method"] == m]
        ok = [r for r in mine if "error" not in r]
        if not ok:
            out[m] = mine[0]
            continue
        peaks = sorted(r["peak_bytes"] for r in ok)
        absolute = sorted(r["absolute_peak_bytes"] for r in ok)
        out[m] = {
            "method": m,
            "how": ok[0]["how"],
            "repeats": len(ok),
            "peak_bytes": statistics.median(peaks),
            "peak_bytes_min": peaks[0],
            "peak_bytes_max": peaks[-1],
            "absolute_peak_bytes": absolute[len(absolute) // 2],
        }
    return out


# --------------------------------------------------------------------------- FLOPs / MFU


def forward_flops(model: torch.nn.Module, batch_size: int, seq_len: int) -> float:
    """FLOPs of one forward over a (batch, seq) batch: 2·N per token over the matmul weights
    (all parameters but the input embedding) plus 4·layers·hidden·seq per token for attention
    scores and values (no causal discount, the usual MFU convention)."""
    n_total = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    conf = model.config
    tokens = batch_size * seq_len
    return tokens * (2.0 * (n_total - n_embed) + 4.0 * conf.num_hidden_layers * conf.hidden_size * seq_len)


def peak_tflops_for(device_name: str, dtype: str) -> float | None:
    if dtype not in ("bf16", "bfloat16"):
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


# --------------------------------------------------------------------------- the benchmark


def run(cfg: StepConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; known: {METHODS}")
    if "sft" not in cfg.methods:
        raise ValueError("the ratios are to SFT: keep 'sft' in the methods")
    load_before = load_average()
    device, base, sft_batch, pair_batch = _setup(cfg)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    n_params = sum(p.numel() for p in base.parameters())
    log(
        f"[step] {cfg.model} ({n_params / 1e6:.2f}M params) on {device_name}, engine={cfg.engine}"
        f"{f' zero={cfg.zero_stage}' if cfg.engine == 'deepspeed' else ''}, dtype={cfg.dtype}, "
        f"batch {cfg.batch_size}x{cfg.seq_len}, {cfg.warmup} warm-up + {cfg.steps} timed rounds"
    )

    memory: dict[str, dict[str, Any]] = {}
    if cfg.memory:
        t0 = time.perf_counter()
        parallel = 1 if device.type == "cuda" else min(len(cfg.methods), os.cpu_count() or 1)
        memory = measure_memory(cfg, parallel=parallel)
        log(f"[step] peak memory: {cfg.memory_repeats} fresh process(es) per method in {time.perf_counter() - t0:.0f}s")

    runners = {m: MethodRunner(m, base, cfg, device, sft_batch, pair_batch) for m in cfg.methods}
    times: dict[str, list[float]] = {m: [] for m in cfg.methods}
    cpu_times: dict[str, list[float]] = {m: [] for m in cfg.methods}
    order = list(cfg.methods)
    for r in range(cfg.warmup + cfg.steps):
        shift = r % len(order)
        for m in order[shift:] + order[:shift]:
            c = time.process_time()
            t = time.perf_counter()
            runners[m].step()
            dt = time.perf_counter() - t
            dc = time.process_time() - c
            if r >= cfg.warmup:
                times[m].append(dt)
                cpu_times[m].append(dc)
    load_after = load_average()

    fwd = forward_flops(base, cfg.batch_size, cfg.seq_len)
    peak = cfg.peak_tflops or (peak_tflops_for(device_name, cfg.dtype) if device.type == "cuda" else None)
    sft_mem = memory.get("sft", {}).get("peak_bytes")
    methods: dict[str, dict[str, Any]] = {}
    for m in cfg.methods:
        s = summarize(times[m])
        ratio = statistics.median(a / b for a, b in zip(times[m], times["sft"], strict=True))
        cpu_ratio = statistics.median(a / max(b, 1e-9) for a, b in zip(cpu_times[m], cpu_times["sft"], strict=True))
        flops = THEORY_FORWARDS[m] * fwd
        entry: dict[str, Any] = {
            **s,
            "ratio_to_sft": ratio,
            # CPU time of the process per step: on CPU with one thread, the work done, whatever
            # time the process spent waiting for a core another job held (useless on CUDA).
            "cpu_median_s": statistics.median(cpu_times[m]),
            "cpu_ratio_to_sft": cpu_ratio if device.type == "cpu" else None,
            "theory_ratio_to_sft": THEORY_FORWARDS[m] / THEORY_FORWARDS["sft"],
            "tokens_per_step": runners[m].tokens,
            "examples_per_step": runners[m].examples,
            "tokens_per_s": runners[m].tokens / s["median_s"],
            "examples_per_s": runners[m].examples / s["median_s"],
            "flops_per_step": flops,
            "achieved_tflops": flops / s["median_s"] / 1e12,
            "mfu": (flops / s["median_s"] / (peak * 1e12)) if peak else None,
        }
        mem = memory.get(m)
        if mem is not None:
            entry["peak_mem_bytes"] = mem.get("peak_bytes")
            entry["absolute_peak_mem_bytes"] = mem.get("absolute_peak_bytes")
            entry["peak_mem_range_bytes"] = [mem.get("peak_bytes_min"), mem.get("peak_bytes_max")]
            entry["peak_mem_repeats"] = mem.get("repeats")
            if mem.get("error"):
                entry["memory_error"] = mem["error"]
            if sft_mem and mem.get("peak_bytes") is not None:
                entry["peak_mem_ratio_to_sft"] = mem["peak_bytes"] / sft_mem
        methods[m] = entry
        log(
            f"[step] {m:13s} {s['median_s'] * 1e3:9.1f} ms  {ratio:5.2f}x SFT  "
            + (f"(CPU time {cpu_ratio:4.2f}x)  " if device.type == "cpu" else "")
            + f"{entry['tokens_per_s']:10.0f} tok/s"
            + (f"  mem +{mem['peak_bytes'] / 2**20:.1f} MiB" if mem and mem.get("peak_bytes") is not None else "")
        )

    mem_how = next((v.get("how") for v in memory.values() if v.get("how")), None)
    return {
        "config": asdict(cfg),
        "device": device.type,
        "device_name": device_name,
        "model_params": n_params,
        "torch_threads": torch.get_num_threads(),
        "forward_flops_sft_batch": fwd,
        "peak_tflops": peak,
        "memory_method": mem_how,
        "timing_method": "interleaved rounds (one step of every method per round, rotating order); median "
        "wall-clock step time over rounds after warm-up; ratio = median of per-round paired "
        "ratios to SFT; cpu_* = the same with the process's CPU time (time.process_time)",
        "tokens_note": "tokens = non-pad tokens of the batch the trainable forward sees; DPO/ORPO see chosen+"
        "rejected, i.e. 2x the tokens of SFT/IFT per example",
        "load_average_before": load_before,
        "load_average_after": load_after,
        "methods": methods,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = StepConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=d.model, help="preset (tiny, tiny-100m) or a local model directory")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bf16"])
    p.add_argument("--engine", default=d.engine, choices=["torch", "deepspeed"])
    p.add_argument("--zero", type=int, default=d.zero_stage, choices=[0, 1, 2, 3])
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--methods", default=",".join(d.methods))
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-repeats", type=int, default=d.memory_repeats)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs, bf16)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the JSON result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    cfg = StepConfig(
        model=args.model,
        dtype=args.dtype,
        engine=args.engine,
        zero_stage=args.zero,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup=args.warmup,
        steps=args.steps,
        methods=tuple(args.methods.split(",")),
        device=args.device,
        memory=not args.no_memory,
        memory_repeats=args.memory_repeats,
        peak_tflops=args.peak_tflops,
        threads=args.threads,
    )
    result = run(cfg)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(
        json.dumps(
            {
                m: {
                    k: v
                    for k, v in e.items()
                    if k in ("median_s", "ratio_to_sft", "peak_mem_ratio_to_sft", "tokens_per_s", "mfu")
                }
                for m, e in result["methods"].items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
