"""`make gpu-check`: one command that checks a GPU node, in at most 8 minutes, and writes what it saw.

    python -m benchmarks.gpu_check                      # every visible GPU -> benchmarks/results/gpu/
    python -m benchmarks.gpu_check --smoke --out /tmp/x # the same code path on CPU (tiny preset, gloo, 1 process)

What it runs, on the ``bench-1b`` preset (a Llama of 0.85B parameters built from a config:
hidden 2048, 16 layers, 16/4 heads, SwiGLU 5632, 32,000-entry vocabulary; random init, nothing
downloaded) with synthetic token batches (micro-batch 4 x 2048 tokens, the last three quarters of
each row the response):

1. **Equality checks, fp32, on every GPU** (TF32 off, ``sdpa``):
   * packed vs padded: the IFT loss (λ 0.2, γ 0.95) of the same sequences in a padded batch
     (``ift.collate.pad_collate``) and in packed rows (``pack_examples`` -> ``join_pack`` ->
     ``collate_packs``, as training builds them); tolerance ``|Δ| <= 1e-4 + 1e-4·|loss|``;
   * gradient checkpointing on vs off (``pipelines.training.build.enable_checkpointing``): the IFT
     loss (``|Δ| <= 1e-5 + 1e-5·|loss|``) and every parameter's gradient
     (``‖g_on − g_off‖ <= 1e-4·‖g_off‖ + 1e-8`` per tensor).
2. **The grid, bf16**: SFT, IFT and DPO x attention (``sdpa``, and ``flash_attention_2`` where
   the flash-attn package is installed) x ZeRO-2 and ZeRO-3, one process per visible GPU (NCCL;
   one GPU still runs ZeRO-3, world size 1).  Each cell builds what a training worker builds
   (``build_model_and_tokenizer``, ``partitioned_reference``, ``build_objective``,
   ``build_engine``: torch AdamW, no DeepSpeed op is compiled; on CPU, ``--smoke``, DeepSpeed's
   JIT-compiled shared-memory all-reduce is switched off, gloo does the collectives), runs 3 warm-up
   and 10 timed steps (objective, ``engine.backward``, ``engine.step``, CUDA-synchronised) and records the median step
   time, tokens/s, MFU, and the peak ``torch.cuda.max_memory_allocated`` next to the dry run's
   estimate for the same config (``pipelines.training.estimate.estimate_memory``).
3. IFT ÷ SFT step time per (ZeRO stage, attention).

MFU = model FLOPs per step / step time / the GPU's peak dense bf16 FLOP/s, per GPU.  Model FLOPs
per step: SFT ``6·N·T``, IFT ``8·N·T`` (its no-grad prediction pass adds ``2·N·T``), DPO
``16·N·T`` (``6·N·2T`` on the chosen and rejected tokens, ``2·N·2T`` for the reference pass on both),
with ``T`` the tokens of one rank's micro-batch (the SFT batch) and ``N`` the parameters without
the input embedding (a lookup).  Attention's own FLOPs are not counted (the ``6·N·D``
convention); ``mfu_with_attention`` adds ``12·layers·hidden·seq`` per trained token (fwd+bwd; 4 for
a no-grad forward), with no causal discount.  Peaks: ``benchmarks.step_time.PEAK_BF16_TFLOPS``
(A100 312e12, H100 SXM 989e12, H200 989e12, H100 PCIe 756e12, ...), looked up from
``torch.cuda.get_device_name``; ``--peak-tflops`` for anything else.

Budget: ``--budget-s`` (480 s) from the start of the process; before each cell rank 0 checks that
the longest cell of that method so far still fits and otherwise skips the cell with a note.  The
results (``results.json``, ``results.md``) are written after every cell, so a run that is
stopped keeps what it measured.

Needs PyTorch, transformers and DeepSpeed only (peft is imported only for LoRA, not used here):
no Ray, no MLflow, no hub.  Exits 2 without a CUDA GPU (``--smoke`` aside) or without DeepSpeed,
1 when a check fails or a cell errors, else 0.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

DEEPSPEED_SPEC = "deepspeed>=0.16,<0.20"  # pyproject.toml's range (a test keeps the two equal)
DEEPSPEED_TESTED = "0.19.8"
NO_GPU_MESSAGE = (
    "gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); on CPU run `make bench` instead "
    "(`python -m benchmarks.gpu_check --smoke` runs this script's code path on CPU)"
)
NO_DEEPSPEED_MESSAGE = (
    f"gpu-check needs DeepSpeed, which is not installed: pip install '{DEEPSPEED_SPEC}' (tested {DEEPSPEED_TESTED}); "
    f"on a node without a package index, `pip download deepspeed=={DEEPSPEED_TESTED} --no-deps` on a machine with "
    "one, carry the file over and `pip install --no-build-isolation --no-deps deepspeed-*.tar.gz` "
    "(benchmarks/gpu.md, section make gpu-check)"
)
DEFAULT_OUT = "benchmarks/results/gpu"

METHODS = ("sft", "ift", "dpo")
# Forward-pass equivalents per token of the SFT batch (backward = 2 forwards): SFT forward + backward; IFT
# the same plus its no-grad prediction pass; DPO forward + backward on chosen and rejected (2x the tokens)
# plus the reference's no-grad forward on both.
FORWARDS = {"sft": 3, "ift": 4, "dpo": 8}

PACKED_TOL = (1e-4, 1e-4)  # (atol, rtol) on the IFT loss, packed vs padded
CKPT_LOSS_TOL = (1e-5, 1e-5)  # (atol, rtol) on the IFT loss, checkpointing on vs off
CKPT_GRAD_RTOL = 1e-4  # ‖g_on − g_off‖ <= CKPT_GRAD_RTOL·‖g_off‖ + 1e-8, per parameter
LAM, DECAY = 0.2, 0.95


@dataclass(frozen=True)
class CheckOptions:
    out: str = DEFAULT_OUT
    smoke: bool = False
    model: str = "bench-1b"
    seq_len: int = 2048
    micro_batch: int = 4
    warmup: int = 3
    steps: int = 10
    zero_stages: tuple[int, ...] = (2, 3)
    methods: tuple[str, ...] = METHODS
    attentions: tuple[str, ...] = ("sdpa",)
    budget_s: float = 480.0
    peak_tflops: float | None = None
    world_size: int = 1
    port: int = 0
    start_time: float = 0.0  # time.time() when the command started (the budget counts from there)
    seed: int = 0

    @property
    def device_type(self) -> str:
        return "cpu" if self.smoke else "cuda"


# --------------------------------------------------------------------------- batches


def synthetic_batch(vocab: int, rows: int, seq_len: int, device: torch.device, seed: int) -> tuple[dict, dict]:
    """An SFT batch of random token ids (no padding; the first quarter of each row is the prompt) and
    its DPO pair batch: the SFT rows as ``chosen``, and ``rejected`` with other random response tokens."""
    from ift.data import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (rows, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : seq_len // 4] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    is_target = labels != IGNORE_INDEX
    rejected = torch.where(is_target, torch.randint(8, vocab, ids.shape, generator=g), ids)
    sft = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pair = {
        "chosen_input_ids": ids,
        "chosen_attention_mask": mask,
        "chosen_labels": labels,
        "rejected_input_ids": rejected,
        "rejected_attention_mask": mask.clone(),
        "rejected_labels": torch.where(is_target, rejected, labels),
    }
    return _to(sft, device), _to(pair, device)


def check_examples(vocab: int, count: int, shortest: int, longest: int, seed: int) -> list[dict[str, list[int]]]:
    """Tokenized SFT examples of random lengths (a quarter prompt) for the equality checks."""
    from ift.data import IGNORE_INDEX

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(shortest, longest)
        prompt = max(1, length // 4)
        ids = [rng.randrange(8, vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- equality checks (fp32)


def _close(a: float, b: float, tol: tuple[float, float]) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tol[0] + tol[1] * abs(b)


def _ift(model: torch.nn.Module, batch: dict):
    from ift.objectives import ift_loss

    return ift_loss(
        model, batch["input_ids"], batch.get("attention_mask"), batch["labels"], lam=LAM, decay=DECAY,
        position_ids=batch.get("position_ids"),
    )  # fmt: skip


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = _ift(model, batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(out.loss.detach()), grads


def packed_vs_padded(model: torch.nn.Module, examples: list[dict], pack_length: int, pad_id: int, device) -> dict:
    """The IFT loss of ``examples`` padded and packed (the training path's packer), fp32."""
    from ift.collate import collate_packs, join_pack, pack_examples, pad_collate

    padded = _to(pad_collate(examples, pad_id), device)
    groups = pack_examples(examples, pack_length)
    packed = _to(collate_packs([join_pack([examples[i] for i in g]) for g in groups], pad_id), device)
    model.eval()
    with torch.no_grad():
        a = float(_ift(model, padded).loss)
        b = float(_ift(model, packed).loss)
    return {
        "padded_loss": a,
        "packed_loss": b,
        "abs_diff": abs(a - b),
        "tolerance": f"|packed - padded| <= {PACKED_TOL[0]:g} + {PACKED_TOL[1]:g}·|padded|",
        "padded_shape": list(padded["input_ids"].shape),
        "packed_shape": list(packed["input_ids"].shape),
        "sequences": len(examples),
        "ok": _close(b, a, PACKED_TOL),
    }


def checkpointing_on_vs_off(model: torch.nn.Module, examples: list[dict], pad_id: int, device) -> dict:
    """The IFT loss and every gradient without, then with gradient checkpointing, fp32 (train mode)."""
    from ift.collate import pad_collate
    from pipelines.training.build import enable_checkpointing

    batch = _to(pad_collate(examples, pad_id), device)
    model.train()
    loss_off, grads_off = _loss_and_grads(model, batch)
    enable_checkpointing(model)
    # Else the comparison proves nothing (transformers 5 renamed the flag, as enable_checkpointing's method).
    flag = (
        "is_activation_checkpointing"
        if hasattr(model, "activation_checkpointing_enable")
        else "is_gradient_checkpointing"
    )
    active = bool(getattr(model, flag, False))
    loss_on, grads_on = _loss_and_grads(model, batch)
    worst, worst_name = 0.0, None
    grads_ok = grads_off.keys() == grads_on.keys() and len(grads_off) > 0
    for name, g in grads_off.items():
        if name not in grads_on:
            continue
        diff, norm = float((grads_on[name] - g).norm()), float(g.norm())
        rel = diff / norm if norm > 0 else diff
        if rel > worst or not math.isfinite(rel):
            worst, worst_name = rel, name
        grads_ok = grads_ok and math.isfinite(diff) and diff <= CKPT_GRAD_RTOL * norm + 1e-8
    return {
        "loss_off": loss_off,
        "loss_on": loss_on,
        "loss_abs_diff": abs(loss_on - loss_off),
        "loss_tolerance": f"|on - off| <= {CKPT_LOSS_TOL[0]:g} + {CKPT_LOSS_TOL[1]:g}·|off|",
        "grad_tolerance": f"||g_on - g_off|| <= {CKPT_GRAD_RTOL:g}·||g_off|| + 1e-8 per parameter",
        "parameters_compared": len(grads_off),
        "worst_grad_rel_diff": worst,
        "worst_grad_parameter": worst_name,
        "checkpointing_active": active,
        "ok": active and _close(loss_on, loss_off, CKPT_LOSS_TOL) and grads_ok,
    }


def run_checks(opts: CheckOptions, device: torch.device) -> dict[str, Any]:
    """Both equality checks on one fp32 model of the preset (sdpa, TF32 off)."""
    from ift.models import load_model
    from ift.tokenization import load_tokenizer

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tokenizer = load_tokenizer(opts.model)
    model = load_model(opts.model, dtype="float32", seed=opts.seed, tokenizer=tokenizer, attn_implementation="sdpa")
    model = model.to(device)
    vocab = int(model.config.vocab_size)
    examples = check_examples(vocab, 8, opts.seq_len // 16, opts.seq_len // 4, opts.seed)
    pad_id = tokenizer.pad_token_id
    out = {
        "model": opts.model,
        "dtype": "float32",
        "attention": "sdpa",
        "objective": f"ift_loss(lam={LAM}, decay={DECAY})",
        "packed_vs_padded": packed_vs_padded(model, examples, opts.seq_len // 2, pad_id, device),
        "checkpointing": checkpointing_on_vs_off(model, examples, pad_id, device),
    }
    del model
    _free(device)
    return out


# --------------------------------------------------------------------------- one grid cell


def train_config(opts: CheckOptions, method: str, attention: str, zero: int):
    """The pipeline's own config for a cell (``pipelines.config_loading.load_config``)."""
    from pipelines.config_loading import load_config

    gpu = not opts.smoke
    return load_config(
        None,
        [
            f"model.name={opts.model}",
            "model.dtype=auto",
            f"model.attn_implementation={attention}",
            "model.gradient_checkpointing=false",
            f"method.name={method}",
            f"data.max_length={opts.seq_len}",
            f"optimization.micro_batch_size={opts.micro_batch}",
            "optimization.gradient_accumulation_steps=1",
            "optimization.lr=1e-5",
            "optimization.warmup_ratio=0",
            "optimization.schedule=constant",
            f"optimization.seed={opts.seed}",
            f"deepspeed.zero_stage={zero}",
            f"deepspeed.precision={'bf16' if gpu else 'fp32'}",
            f"scaling.num_workers={opts.world_size}",
            f"scaling.use_gpu={'true' if gpu else 'false'}",
            "mlflow.enabled=false",
        ],
    )


def _memory_start(device: torch.device) -> int:
    """Reset the peak counter; the bytes in use now (GPU: allocated; CPU: resident set)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    from benchmarks.step_time import _reset_peak_rss, _rss_bytes

    _reset_peak_rss()
    return _rss_bytes()[0]


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    from benchmarks.step_time import _rss_bytes

    return _rss_bytes()[1]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _release(*engines: Any) -> None:
    """Unhook DeepSpeed engines (ZeRO-3 keeps module hooks and gathered buffers otherwise)."""
    for engine in engines:
        destroy = getattr(engine, "destroy", None)
        if callable(destroy):
            destroy()


def _timed_steps(engine, objective, batch: dict, opts: CheckOptions, device: torch.device) -> tuple[list[float], float]:
    times: list[float] = []
    loss = float("nan")
    for i in range(opts.warmup + opts.steps):
        t = time.perf_counter()
        out = objective(engine, batch, i)
        engine.backward(out.loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= opts.warmup:
            times.append(time.perf_counter() - t)
        loss = float(out.loss.detach())
    return times, loss


def run_cell(opts: CheckOptions, method: str, attention: str, zero: int, rank: int, device: torch.device) -> dict:
    """Build what a training worker builds for this config, time its steps, read the peak memory."""
    from pipelines.training.build import build_engine, build_model_and_tokenizer, partitioned_reference
    from pipelines.training.methods import build_objective

    cfg = train_config(opts, method, attention, zero)
    use_gpu = device.type == "cuda"
    baseline = _memory_start(device)
    model, tokenizer = build_model_and_tokenizer(cfg, use_gpu)
    reference = partitioned_reference(cfg, tokenizer, use_gpu)
    objective = build_objective(cfg.method, model, device, seed=opts.seed, rank=rank, reference=reference)
    vocab = int(model.config.vocab_size)
    engine = build_engine(cfg, model, total_steps=10**6, use_gpu=use_gpu)
    sft, pair = synthetic_batch(vocab, opts.micro_batch, opts.seq_len, device, opts.seed + rank)
    try:
        times, loss = _timed_steps(engine, objective, pair if cfg.method.paired else sft, opts, device)
        peak = _memory_peak(device)
    finally:
        _release(engine, getattr(objective, "reference", None))
        del engine, objective, model, reference, sft, pair
        _free(device)
    return {"times": times, "loss": loss, "peak_bytes": peak, "baseline_bytes": baseline}


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Flops:
    n: int  # parameters without the input embedding
    layers: int
    hidden: int
    peak: float | None  # FLOP/s per GPU, dense bf16

    def per_step(self, method: str, tokens: int, seq_len: int, *, attention: bool = False) -> float:
        flops = 2.0 * self.n * FORWARDS[method] * tokens
        if attention:  # 4·L·h·s per token and forward, no causal discount
            flops += 4.0 * self.layers * self.hidden * seq_len * FORWARDS[method] * tokens
        return flops


def cell_figures(raw: dict, method: str, opts: CheckOptions, flops: Flops, estimate: Any) -> dict[str, Any]:
    from benchmarks.common import summarize

    s = summarize(raw["times"])
    tokens = opts.micro_batch * opts.seq_len  # one rank's SFT batch; DPO's trained tokens are twice this
    trained_tokens = tokens * (2 if method == "dpo" else 1)
    step_flops = flops.per_step(method, tokens, opts.seq_len)
    with_attention = flops.per_step(method, tokens, opts.seq_len, attention=True)
    median = s["median_s"]
    peak = raw["peak_bytes"] - raw["baseline_bytes"]
    return {
        "step_time_s": median,
        "step_time_p25_s": s["p25_s"],
        "step_time_p75_s": s["p75_s"],
        "step_times_s": raw["times"],
        "tokens_per_step_per_gpu": trained_tokens,
        "tokens_per_s": trained_tokens * opts.world_size / median,
        "flops_per_step_per_gpu": step_flops,
        "achieved_tflops_per_gpu": step_flops / median / 1e12,
        "mfu": step_flops / median / flops.peak if flops.peak else None,
        "mfu_with_attention": with_attention / median / flops.peak if flops.peak else None,
        "peak_mem_bytes": peak,
        "absolute_peak_mem_bytes": raw["peak_bytes"],
        "baseline_mem_bytes": raw["baseline_bytes"],
        "estimate_bytes": estimate.gpu_total,
        "estimate_parts_bytes": dict(estimate.per_gpu),
        "peak_over_estimate": peak / estimate.gpu_total if estimate.gpu_total else None,
        "final_loss": raw["loss"],
    }


def ift_over_sft(cells: dict[str, dict]) -> dict[str, float]:
    """IFT ÷ SFT median step time for every (ZeRO stage, attention) that has both."""
    out = {}
    for key, cell in cells.items():
        group, method = key.rsplit("/", 1)
        sft = cells.get(f"{group}/sft", {})
        if method == "ift" and "step_time_s" in cell and "step_time_s" in sft:
            out[group] = cell["step_time_s"] / sft["step_time_s"]
    return out


def plan(opts: CheckOptions) -> list[tuple[int, str, str]]:
    """(ZeRO stage, attention, method), most wanted first: a budget cut drops the end."""
    return [(z, a, m) for a in opts.attentions for z in opts.zero_stages for m in opts.methods]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def overall_ok(results: dict) -> bool:
    checks = results.get("checks", {})
    if not all(checks.get(k, {}).get("ok") for k in ("packed_vs_padded", "checkpointing")):
        return False
    if not results.get("checks_on_every_rank_ok", True):
        return False
    cells = results["cells"].values()
    return bool(cells) and all("error" not in c and _finite(c.get("final_loss")) for c in cells)


# --------------------------------------------------------------------------- the report


def _fmt_gib(n: float | None) -> str:
    from benchmarks.common import fmt_bytes

    return fmt_bytes(n)


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# make gpu-check",
        "",
        f"{results['device_name']} x {s['world_size']} ({results['backend']}), `{s['model']}` "
        f"({_fmt_count(results['model']['parameters'])} parameters), micro-batch {s['micro_batch']} x {s['seq_len']} "
        f"tokens per GPU, {s['warmup']} warm-up + {s['steps']} timed steps per cell; {results['elapsed_s']:.0f} s of "
        f"a {s['budget_s']:.0f} s budget; {results['date_utc']}."
        + (" **Smoke run on CPU: no figure here says anything about a GPU.**" if s["smoke"] else ""),
        "",
        f"MFU: {results['mfu_formula']}  Peak used: "
        + (f"{results['peak_flops'] / 1e12:.1f} TFLOP/s per GPU." if results["peak_flops"] else "unknown (MFU empty)."),
        "",
        "| ZeRO / attention / method | step, ms | tokens/s (all GPUs) | MFU | MFU incl. attention | peak memory "
        "| dry-run estimate | peak ÷ estimate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, c in results["cells"].items():
        if "error" in c:
            lines.append(f"| {key} | error: `{c['error'][:120]}` | | | | | | |")
            continue
        lines.append(
            f"| {key} | {c['step_time_s'] * 1e3:.1f} | {c['tokens_per_s']:,.0f} | {_fmt_pct(c['mfu'])} "
            f"| {_fmt_pct(c['mfu_with_attention'])} | {_fmt_gib(c['peak_mem_bytes'])} "
            f"| {_fmt_gib(c['estimate_bytes'])} | {c['peak_over_estimate']:.2f} |"
        )
    lines += ["", "IFT ÷ SFT step time: " + (
        ", ".join(f"{k} {v:.2f}x" for k, v in results["ift_over_sft"].items()) or "n/a"
    ) + "."]  # fmt: skip
    lines += ["", *_render_checks(results)]
    for note in results["notes"]:
        lines.append(f"* {note}")
    lines += ["", f"Overall: {'OK' if results['ok'] else 'FAILED'}.", ""]
    return "\n".join(lines)


def _render_checks(results: dict) -> list[str]:
    c = results.get("checks")
    if not c:
        return ["Equality checks: not run.", ""]
    p, k = c["packed_vs_padded"], c["checkpointing"]
    every = "" if results.get("checks_on_every_rank_ok", True) else " (**failed on another GPU**: see results.json)"
    return [
        f"Equality checks (fp32, sdpa, {c['objective']}){every}:",
        "",
        f"* packed vs padded: {'OK' if p['ok'] else 'FAILED'}, loss {p['padded_loss']:.6f} vs {p['packed_loss']:.6f} "
        f"(|Δ| {p['abs_diff']:.2e}; {p['tolerance']});",
        f"* gradient checkpointing on vs off: {'OK' if k['ok'] else 'FAILED'}, loss |Δ| {k['loss_abs_diff']:.2e} "
        f"({k['loss_tolerance']}), worst gradient relative difference {k['worst_grad_rel_diff']:.2e} "
        f"({k['worst_grad_parameter']}; {k['grad_tolerance']}).",
        "",
    ]


# --------------------------------------------------------------------------- one rank


def _init_rank(rank: int, opts: CheckOptions) -> torch.device:
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(opts.port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(opts.world_size), LOCAL_WORLD_SIZE=str(opts.world_size),
    )  # fmt: skip
    if opts.smoke:
        device = torch.device("cpu")
        # On CPU DeepSpeed's torch backend JIT-compiles a C++ shared-memory all-reduce (deepspeed_shm_comm) when
        # it wraps the process group; gloo does every collective here, so it goes without: nothing is compiled.
        # (By sys.modules: the attribute deepspeed.comm.torch is the torch package, re-exported by deepspeed.comm.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("gloo" if opts.smoke else "nccl", rank=rank, world_size=opts.world_size)
    import logging

    import deepspeed  # its logger exists once imported; its INFO lines (the whole config per engine) would bury ours

    deepspeed.utils.logger.setLevel(logging.WARNING)
    return device


def _header(opts: CheckOptions, device: torch.device, flops: Flops, shape: Any) -> dict[str, Any]:
    from benchmarks.common import cpu_model, machine_info

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "kind": "gpu-check",
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device_name": name,
        "backend": "gloo" if opts.smoke else "nccl",
        "machine": machine_info(),
        "settings": {k: v for k, v in asdict(opts).items() if k not in ("port", "start_time")},
        "model": {
            "parameters": shape.parameters,
            "flops_parameters": flops.n,
            "layers": shape.layers,
            "hidden": shape.hidden,
            "heads": shape.heads,
            "vocab": shape.vocab,
        },  # fmt: skip
        "peak_flops": flops.peak,
        "peak_flops_source": "--peak-tflops" if opts.peak_tflops else "benchmarks.step_time.PEAK_BF16_TFLOPS",
        "mfu_formula": "model FLOPs per step per GPU / step time / peak bf16 FLOP/s; model FLOPs per step = "
        "SFT 6·N·T, IFT 8·N·T (+2·N·T: the no-grad prediction pass), DPO 16·N·T (6·N·2T chosen+rejected + 2·N·2T "
        "reference), T = tokens of one GPU's SFT micro-batch, N = parameters without the input embedding; "
        "attention FLOPs only in mfu_with_attention (4·layers·hidden·seq per token and forward).",
        "memory_method": "torch.cuda.max_memory_allocated over the cell (model build, engine, steps) minus "
        "memory_allocated at its start; CPU (--smoke): peak RSS minus RSS at the start (not comparable to the "
        "estimate)",
        "estimate_method": "pipelines.training.estimate.estimate_memory for the cell's config (per GPU, a floor)",
        "checks": {},
        "cells": {},
        "ift_over_sft": {},
        "notes": [],
        # Filled in at the end.  Ray never is; DeepSpeed itself imports mlflow where it is installed (autotuning).
        "ray_or_mlflow_imported": None,
        "elapsed_s": 0.0,
        "ok": False,
    }


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write(results: dict, opts: CheckOptions) -> None:
    results["elapsed_s"] = time.time() - opts.start_time
    results["ift_over_sft"] = ift_over_sft(results["cells"])
    results["ok"] = overall_ok(results)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render(results))


def _checks_every_rank(opts: CheckOptions, device: torch.device, rank: int, results: dict) -> None:
    import torch.distributed as dist

    t = time.time()
    checks = run_checks(opts, device)
    ok = checks["packed_vs_padded"]["ok"] and checks["checkpointing"]["ok"]
    every = [None] * opts.world_size
    dist.all_gather_object(every, {"rank": rank, "ok": ok, "checks": checks})
    if rank == 0:
        results["checks"] = checks
        results["checks_on_every_rank_ok"] = all(e["ok"] for e in every)
        if not results["checks_on_every_rank_ok"]:
            results["checks_per_rank"] = every
        p, k = checks["packed_vs_padded"], checks["checkpointing"]
        print(
            f"[gpu-check] checks on {opts.world_size} device(s): packed vs padded {'OK' if p['ok'] else 'FAILED'} "
            f"(|Δ| {p['abs_diff']:.1e}), checkpointing {'OK' if k['ok'] else 'FAILED'} (loss |Δ| "
            f"{k['loss_abs_diff']:.1e}, worst grad {k['worst_grad_rel_diff']:.1e}); {time.time() - t:.0f} s",
            flush=True,
        )


def _fits(results: dict, method: str, opts: CheckOptions) -> bool:
    """Whether the longest cell of ``method`` so far (any cell, before the first) still fits the budget."""
    spent = [c["cell_s"] for c in results["cells"].values() if "cell_s" in c]
    same = [c["cell_s"] for c in results["cells"].values() if "cell_s" in c and c["method"] == method]
    expected = max(same or spent or [0.0])
    return time.time() - opts.start_time + expected <= opts.budget_s


def _one_cell(opts, cell, rank, device, flops, shape) -> dict:
    from pipelines.training.estimate import estimate_memory

    zero, attention, method = cell
    t = time.time()
    error = None
    try:
        raw = run_cell(opts, method, attention, zero, rank, device)
    except Exception as exc:  # an OOM in one cell: recorded, the others still run
        error = f"{type(exc).__name__}: {exc}"[:2000]
    if error is not None:
        _free(device)  # out of the except block: its traceback no longer holds the cell's tensors
        return {"method": method, "attention": attention, "zero_stage": zero, "error": error,
                "cell_s": time.time() - t}  # fmt: skip
    estimate = estimate_memory(train_config(opts, method, attention, zero), shape, use_gpu=device.type == "cuda")
    figures = cell_figures(raw, method, opts, flops, estimate)
    return {"method": method, "attention": attention, "zero_stage": zero, **figures, "cell_s": time.time() - t}


def _log_cell(key: str, c: dict, opts: CheckOptions) -> None:
    elapsed = f"cell {c['cell_s']:.0f} s, elapsed {time.time() - opts.start_time:.0f}/{opts.budget_s:.0f} s"
    if "error" in c:
        print(f"[gpu-check] {key}: ERROR {c['error'][:300]} ({elapsed})", flush=True)
        return
    print(
        f"[gpu-check] {key}: {c['step_time_s'] * 1e3:.1f} ms/step, {c['tokens_per_s']:,.0f} tok/s, "
        f"MFU {_fmt_pct(c['mfu'])}, peak {_fmt_gib(c['peak_mem_bytes'])} (estimate "
        f"{_fmt_gib(c['estimate_bytes'])}), loss {c['final_loss']:.3f} ({elapsed})",
        flush=True,
    )


def worker(rank: int, opts: CheckOptions) -> None:
    """One rank: the checks, then every cell of the grid that fits the budget; rank 0 writes the results."""
    import torch.distributed as dist

    from benchmarks.step_time import peak_tflops_for
    from pipelines.training.estimate import model_shape

    device = _init_rank(rank, opts)
    shape = model_shape(train_config(opts, "sft", "sdpa", opts.zero_stages[0]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak_tflops = opts.peak_tflops or peak_tflops_for(name, "bf16")
    flops = Flops(shape.parameters - shape.vocab * shape.hidden, shape.layers, shape.hidden,
                  peak_tflops * 1e12 if peak_tflops else None)  # fmt: skip
    results = _header(opts, device, flops, shape)
    if flops.peak is None:
        results["notes"].append(f"no bf16 peak known for {results['device_name']!r}: MFU left empty (--peak-tflops)")
    if "flash_attention_2" not in opts.attentions:
        results["notes"].append("flash_attention_2 not run: the flash-attn package is not installed (or --smoke)")
    _checks_every_rank(opts, device, rank, results)
    if rank == 0:
        _write(results, opts)
    for cell in plan(opts):
        zero, attention, method = cell
        key = f"zero{zero}/{attention}/{method}"
        if not _broadcast(_fits(results, method, opts) if rank == 0 else None):
            if rank == 0:
                results["notes"].append(f"{key} skipped: the {opts.budget_s:.0f} s budget would run out")
                print(f"[gpu-check] {key}: skipped (budget)", flush=True)
            continue
        entry = _one_cell(opts, cell, rank, device, flops, shape)
        if rank == 0:
            results["cells"][key] = entry
            _log_cell(key, entry, opts)
            _write(results, opts)
    dist.barrier()
    if rank == 0:
        results["ray_or_mlflow_imported"] = sorted({n.split(".")[0] for n in sys.modules} & {"ray", "mlflow"})
        _write(results, opts)
    dist.destroy_process_group()


# --------------------------------------------------------------------------- command line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def options(args: argparse.Namespace, start: float) -> CheckOptions:
    if args.smoke:
        opts = CheckOptions(model="tiny", seq_len=128, micro_batch=2, warmup=0, steps=2, zero_stages=(2,))
    else:
        flash = importlib.util.find_spec("flash_attn") is not None
        opts = CheckOptions(
            attentions=("sdpa", "flash_attention_2") if flash else ("sdpa",), world_size=torch.cuda.device_count()
        )
    names = ("model", "seq_len", "micro_batch", "warmup", "steps")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    return replace(
        opts, **given, smoke=args.smoke, out=args.out, budget_s=args.budget_s, peak_tflops=args.peak_tflops,
        port=_free_port(), start_time=start,
    )  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU: tiny preset, gloo, 1 process, 2 steps, ZeRO-2, sdpa")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for results.json and results.md")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip cells that would end past this (seconds)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s per device, for MFU")
    p.add_argument("--model", default=None, help="preset or local model directory (default bench-1b; smoke: tiny)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    return p.parse_args(argv)


def _process_start() -> float:
    """When this process started (the budget counts the imports too); now, where psutil is missing."""
    try:
        import psutil  # a DeepSpeed dependency

        return psutil.Process().create_time()
    except Exception:
        return time.time()


def main(argv: list[str] | None = None) -> int:
    start = _process_start()
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        return 2
    if importlib.util.find_spec("deepspeed") is None:
        print(NO_DEEPSPEED_MESSAGE, file=sys.stderr)
        return 2
    opts = options(args, start)
    print(
        f"[gpu-check] {opts.world_size} {'CPU process (smoke)' if opts.smoke else 'GPU(s)'}, {opts.model}, "
        f"micro-batch {opts.micro_batch} x {opts.seq_len}, ZeRO {opts.zero_stages}, {opts.attentions}, "
        f"{opts.warmup}+{opts.steps} steps per cell, budget {opts.budget_s:.0f} s -> {opts.out}",
        flush=True,
    )
    # By its import name, not __main__: the spawned ranks import this module and find ``worker`` there.
    this = importlib.import_module("benchmarks.gpu_check")
    if opts.world_size == 1:
        this.worker(0, opts)
    else:
        import torch.multiprocessing as mp

        mp.spawn(this.worker, args=(opts,), nprocs=opts.world_size, join=True)
    results = json.loads((Path(opts.out) / "results.json").read_text())
    print(f"[gpu-check] {'OK' if results['ok'] else 'FAILED'} in {time.time() - start:.0f} s: {opts.out}/results.md")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
