"""Packing: padding fraction and useful tokens/s per method, padded vs packed, with TRL as the peer.

The corpus has the long-tailed lengths of chat data: each example's total length
is lognormal (``LengthModel``: median e^5.0 ≈ 148 tokens, σ = 0.8, clipped to
16..512), its prompt a uniform 10–50 % of that, token ids uniform over the
tokenizer's ordinary ids.  A preference pair shares the prompt and draws its
chosen and rejected response lengths independently.

Both layouts see the same examples in the same order (``window`` examples per
round) and train the same model (a copy of one start) with the method's objective
from ``pipelines.training.methods`` and a plain AdamW step (clip 1.0), as
``benchmarks.step_time`` does:

* *padded*: micro-batches of ``batch_size`` examples right-padded to their
  longest (:func:`ift.collate.pad_collate`, the pipeline's default layout);
* *packed*: the window best-fit-decreasing packed into rows of at most
  ``pack_length`` tokens (the length model's maximum, as ``data.pack_length``
  defaults to ``data.max_length``; twice that for pairs, whose chosen and
  rejected sequences share a row), ``batch_size`` rows per micro-batch: the
  padded micro-batch's shape at full length, filled with real tokens
  (:class:`pipelines.data.batching.MicroBatches` with ``data.packing=true`` does
  exactly this: :func:`ift.collate.pack_examples` + :func:`ift.collate.collate_packs`).

*Useful tokens* are the real tokens a training forward processes (prompt and
response; for a pair both sequences); *padding fraction* is padding over every
position computed.  The layouts (and methods) take turns in rotating order every
round, so a load spike on a shared machine hits both; a layout's tokens/s is
its useful tokens over its time summed over the timed rounds, and the ratio is
the median of the per-round ratios.

The peer: TRL's ``SFTTrainer`` and ``DPOTrainer`` (``padding_free=True``; see
:mod:`benchmarks.trl_peer`) on the same model, examples, examples per
micro-batch (``batch_size``) and thread count: what most users would run
instead of ``ift train`` for SFT and DPO.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from benchmarks.common import load_average
from pipelines.config import METHOD_CONFIGS

METHODS = ("sft", "ift", "dpo", "orpo")
LAYOUTS = ("padded", "packed")


@dataclass(frozen=True)
class LengthModel:
    """Lognormal total lengths with a uniform prompt share (see the module docstring)."""

    log_median: float = 5.0
    sigma: float = 0.8
    min_tokens: int = 16
    max_tokens: int = 512
    prompt_share: tuple[float, float] = (0.1, 0.5)

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """(prompt tokens, response tokens)."""
        total = int(round(math.exp(rng.gauss(self.log_median, self.sigma))))
        total = min(max(total, self.min_tokens), self.max_tokens)
        prompt = max(1, int(total * rng.uniform(*self.prompt_share)))
        return prompt, max(1, total - prompt)


@dataclass
class PackingBenchConfig:
    model: str = "tiny"
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bf16 (autocast, as benchmarks.step_time)
    attn_implementation: str | None = None  # None = the model's (sdpa); "flash_attention_2" on a GPU
    examples: int = 512
    window: int = 256  # examples per round, packed together
    rounds: int = 4  # timed rounds (each covers the next window of examples)
    warmup_rounds: int = 1
    batch_size: int = 8
    pack_length: int = 512
    methods: tuple[str, ...] = METHODS
    lengths: LengthModel = field(default_factory=LengthModel)
    threads: int = 1
    lr: float = 1e-5
    seed: int = 0
    trl: bool = True
    trl_steps: int = 24
    trl_warmup: int = 2


# --------------------------------------------------------------------------- the corpus


def make_examples(cfg: PackingBenchConfig, vocab: int, first_id: int, *, pairs: bool) -> list[dict[str, list[int]]]:
    """Tokenized examples (``input_ids``/``labels``, or ``chosen_*``/``rejected_*``) with the length model."""
    from ift.data import IGNORE_INDEX

    rng = random.Random(cfg.seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(first_id, vocab) for _ in range(n)]

    out = []
    for _ in range(cfg.examples):
        prompt_len, response_len = cfg.lengths.draw(rng)
        prompt = ids(prompt_len)
        if not pairs:
            response = ids(response_len)
            out.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * prompt_len + response})
            continue
        ex: dict[str, list[int]] = {}
        for side in ("chosen", "rejected"):
            n = response_len if side == "chosen" else cfg.lengths.draw(rng)[1]
            n = min(n, cfg.lengths.max_tokens - prompt_len)
            response = ids(max(1, n))
            ex[f"{side}_input_ids"] = prompt + response
            ex[f"{side}_labels"] = [IGNORE_INDEX] * prompt_len + response
        out.append(ex)
    return out


Micro = tuple[dict, int, int]  # (batch, useful tokens, positions computed)


def micro_batches(examples: list[dict], layout: str, cfg: PackingBenchConfig, pad_id: int) -> list[Micro]:
    """The window's micro-batches in ``layout``, each as (batch, useful tokens, positions computed)."""
    from ift.collate import collate_packs, join_pack, pack_examples, pad_collate

    step = cfg.batch_size
    if layout == "padded":
        groups = [[[i] for i in range(j, j + step)] for j in range(0, len(examples) - step + 1, step)]
    else:
        pairs = "chosen_input_ids" in examples[0]  # a pair packs chosen and rejected side by side: twice the room
        rows = pack_examples(examples, cfg.pack_length * (2 if pairs else 1))
        groups = [rows[j : j + step] for j in range(0, len(rows), step)]
    out = []
    for group in groups:
        chosen = [examples[i] for row in group for i in row]
        if layout == "padded":
            batch = pad_collate(chosen, pad_id)
        else:
            batch = collate_packs([join_pack([examples[i] for i in row]) for row in group], pad_id)
        useful = sum(len(v) for e in chosen for k, v in e.items() if k.endswith("input_ids"))
        out.append((batch, useful, sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))))
    return out


# --------------------------------------------------------------------------- the benchmark


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _corpus_summary(examples: list[dict]) -> dict[str, Any]:
    key = "input_ids" if "input_ids" in examples[0] else "chosen_input_ids"
    lengths = sorted(len(e[key]) for e in examples)
    pick = lambda q: lengths[min(len(lengths) - 1, int(q * len(lengths)))]
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": lengths[-1],
            "mean": statistics.fmean(lengths)}  # fmt: skip


def run(cfg: PackingBenchConfig | None = None, *, log: Callable[[str], None] = print, **overrides: Any) -> dict:
    from benchmarks.step_time import MethodRunner, StepConfig
    from ift.models import load_model
    from ift.tokenization import load_tokenizer

    cfg = cfg or PackingBenchConfig(**overrides)
    step_cfg = StepConfig(
        model=cfg.model, lr=cfg.lr, seed=cfg.seed, threads=cfg.threads, memory=False, device=cfg.device,
        dtype=cfg.dtype,
    )  # fmt: skip
    device = torch.device(step_cfg.resolved_device())
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, dtype="float32", seed=cfg.seed, tokenizer=tokenizer)
    if cfg.attn_implementation:
        base.set_attn_implementation(cfg.attn_implementation)
    vocab, first_id = len(tokenizer), max(tokenizer.all_special_ids) + 1
    corpora = {pairs: make_examples(cfg, vocab, first_id, pairs=pairs) for pairs in (False, True)}
    out: dict[str, Any] = {
        "config": {**asdict(cfg), "lengths": asdict(cfg.lengths)},
        "load_average_before": load_average(),
        "corpus": {"sft": _corpus_summary(corpora[False]), "pairs": _corpus_summary(corpora[True])},
        "methods": {},
    }
    log(
        f"[pack] {cfg.model}, {cfg.examples} examples, lengths p50 {out['corpus']['sft']['p50']} "
        f"p90 {out['corpus']['sft']['p90']} max {out['corpus']['sft']['max']}; {cfg.batch_size} rows per micro-batch, "
        f"padded or packed ({cfg.pack_length} tokens); {cfg.warmup_rounds}+{cfg.rounds} rounds of {cfg.window} examples"
    )

    pad = tokenizer.pad_token_id
    runners: dict[tuple[str, str], MethodRunner] = {}
    windows: dict[tuple[str, str], list[list[Micro]]] = {}
    for method in cfg.methods:
        pairs = METHOD_CONFIGS[method].paired
        examples = corpora[pairs]
        for layout in LAYOUTS:
            windows[method, layout] = [
                [
                    (to_device(b, device), u, n)
                    for b, u, n in micro_batches(examples[i : i + cfg.window], layout, cfg, pad)
                ]
                for i in range(0, len(examples) - cfg.window + 1, cfg.window)
            ]
            first = windows[method, "padded"][0][0][0]  # the runner's own batch: only its step(batch) is used
            runners[method, layout] = MethodRunner(
                method, base, step_cfg, device, first if not pairs else None, first if pairs else None
            )

    seconds = {key: [] for key in runners}
    tokens = {key: [] for key in runners}
    order = list(runners)
    n_windows = len(next(iter(windows.values())))
    for r in range(cfg.warmup_rounds + cfg.rounds):
        batches_round = r % n_windows
        for key in order[r % len(order) :] + order[: r % len(order)]:
            batches = windows[key][batches_round]
            t0 = time.perf_counter()
            for batch, _, _ in batches:
                runners[key].step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r >= cfg.warmup_rounds:
                seconds[key].append(time.perf_counter() - t0)
                tokens[key].append(sum(useful for _, useful, _ in batches))
        log(f"[pack] round {r + 1}/{cfg.warmup_rounds + cfg.rounds} done")

    for method in cfg.methods:
        row: dict[str, Any] = {}
        for layout in LAYOUTS:
            counts = [(u, n) for w in windows[method, layout] for _, u, n in w]
            useful, positions = sum(c[0] for c in counts), sum(c[1] for c in counts)
            row[layout] = {
                "padding_fraction": 1 - useful / positions,
                "micro_batches_per_window": statistics.fmean(len(w) for w in windows[method, layout]),
                "tokens_per_s": sum(tokens[method, layout]) / sum(seconds[method, layout]),
            }
        packed, padded = (list(zip(tokens[method, k], seconds[method, k], strict=True)) for k in ("packed", "padded"))
        per_round = [(tp / sp) / (tq / sq) for (tp, sp), (tq, sq) in zip(packed, padded, strict=True)]
        row["packed_over_padded"] = statistics.median(per_round)
        out["methods"][method] = row
        log(
            f"[pack] {method}: padding {row['padded']['padding_fraction']:.1%} -> "
            f"{row['packed']['padding_fraction']:.1%}; "
            f"useful tokens/s {row['padded']['tokens_per_s']:,.0f} -> {row['packed']['tokens_per_s']:,.0f} "
            f"({row['packed_over_padded']:.2f}x)"
        )

    if cfg.trl and device.type == "cpu":  # the peer runs on CPU only (benchmarks.trl_peer)
        out["trl"] = _trl_rows(cfg, corpora, log)
    out["load_average_after"] = load_average()
    return out


def _trl_rows(cfg: PackingBenchConfig, corpora: dict[bool, list[dict]], log: Callable[[str], None]) -> dict:
    """TRL's SFT and DPO trainers (padding-free) on the same examples, or why they did not run."""
    try:
        from benchmarks.trl_peer import trl_tokens_per_s
    except ImportError as exc:  # trl is a benchmark-only dependency
        return {"error": f"not run: {exc} (pip install -e '.[bench]')"}
    rows: dict[str, Any] = {}
    for method, pairs in (("sft", False), ("dpo", True)):
        if method not in cfg.methods:
            continue
        examples = [_as_trl(e, pairs) for e in corpora[pairs]]
        try:
            rows[method] = trl_tokens_per_s(
                method, cfg.model, copy.deepcopy(examples), batch_size=cfg.batch_size,
                max_length=cfg.lengths.max_tokens, steps=cfg.trl_steps, warmup=cfg.trl_warmup,
                threads=cfg.threads, padding_free=True, lr=cfg.lr,
            )  # fmt: skip
            log(f"[pack] TRL {method} (padding_free): {rows[method]['tokens_per_s']:,.0f} useful tokens/s")
        except Exception as exc:  # reported, the rest of the section stands
            rows[method] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            log(f"[pack] TRL {method} FAILED: {rows[method]['error']}")
    return rows


def _as_trl(example: dict[str, list[int]], pairs: bool) -> dict[str, list[int]]:
    """Our tokenized example as the prompt/completion ids TRL's trainers take."""
    from ift.data import IGNORE_INDEX

    key = "chosen_" if pairs else ""
    labels = example[f"{key}labels"]
    prompt_len = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    prompt = example[f"{key}input_ids"][:prompt_len]
    if not pairs:
        return {"prompt_ids": prompt, "completion_ids": example["input_ids"][prompt_len:]}
    return {
        "prompt_ids": prompt,
        "chosen_ids": example["chosen_input_ids"][prompt_len:],
        "rejected_ids": example["rejected_input_ids"][prompt_len:],
    }
