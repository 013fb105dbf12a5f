"""The lm-evaluation-harness run: an in-memory model and tokenizer in, one primary score per task out.

The model is wrapped in lm-eval's ``HFLM`` with its tokenizer passed
explicitly (so nothing is looked up on the Hub), and every prompt goes through
the tokenizer's chat template, as in the paper.  The caller's train/eval mode
and python/numpy/torch RNG state survive the run, so training can call
:func:`evaluate_model` at its end.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ift.tokenization import ensure_pad_and_template
from pipelines.evaluation.errors import EvalError
from pipelines.evaluation.tasks import TaskSpec, check_tasks, resolve_tasks, task_manager

DEFAULT_BATCH_SIZE = 32
# A task spec without a metric scores by the first of these the task reports.
_METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "f1", "bleu", "mc2", "em")


@dataclass
class EvalResult:
    """Primary scores (``{"ift_arith/exact_match": 0.25, ...}``) plus lm-eval's per-task metrics."""

    scores: dict[str, float]
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    limit: int | None = None


@contextlib.contextmanager
def _preserved_rng(device: Any) -> Iterator[None]:
    """simple_evaluate reseeds python/numpy/torch globally; keep the caller's RNG streams."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if getattr(device, "type", None) == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _quiet_lm_eval(quiet: bool) -> Iterator[None]:
    if not quiet:
        yield
        return
    lg = logging.getLogger("lm_eval")
    old = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(old)


def _pick_metric(spec: TaskSpec, metrics: dict[str, Any]) -> str:
    if spec.metric and spec.metric in metrics:
        return spec.metric
    numeric = [k for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
    for pref in _METRIC_PREFERENCE:
        for k in numeric:
            if k.split(",")[0] == pref:
                return k
    if numeric:
        return numeric[0]
    raise EvalError(f"task {spec.name!r} reported no numeric metric (got {sorted(metrics)})")


def _score_name(spec: TaskSpec, metric_key: str) -> str:
    return f"{spec.name}/{metric_key.split(',')[0]}"


def run_evaluation(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str | TaskSpec] | str | None = None,
    *,
    preset: str | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    check: bool = True,
    quiet: bool = True,
) -> EvalResult:
    """Evaluate an in-memory HF causal LM with lm-eval; see :func:`evaluate_model`."""
    specs = resolve_tasks(tasks, preset)
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    if check:
        check_tasks(specs)

    from lm_eval import simple_evaluate  # the eval extra (pip install -e '.[eval]')
    from lm_eval.models.huggingface import HFLM

    ensure_pad_and_template(tokenizer)
    needs_hub_tasks = any(not s.offline for s in specs)
    t0 = time.perf_counter()
    was_training = bool(getattr(model, "training", False))
    result = EvalResult({}, limit=limit)
    with _quiet_lm_eval(quiet), _preserved_rng(getattr(model, "device", None)):
        manager = task_manager(needs_hub_tasks)
        try:
            lm = HFLM(
                pretrained=model,
                tokenizer=tokenizer,
                backend="causal",
                batch_size=batch_size,
                max_length=max_length,
            )
            # One harness call per few-shot count (the paper mixes 0, 5 and 25 shots).
            by_shots: dict[int, list[TaskSpec]] = {}
            for s in specs:
                by_shots.setdefault(s.num_fewshot, []).append(s)
            for shots, group in by_shots.items():
                out = simple_evaluate(
                    model=lm,
                    tasks=[s.name for s in group],
                    num_fewshot=shots,
                    limit=limit,
                    apply_chat_template=True,
                    fewshot_as_multiturn=True,
                    task_manager=manager,
                    log_samples=False,
                    bootstrap_iters=0,
                )
                if out is None:  # only on non-zero ranks
                    continue
                for s in group:
                    metrics = out["results"].get(s.name)
                    if metrics is None:
                        raise EvalError(f"lm-eval returned no results for task {s.name!r}")
                    key = _pick_metric(s, metrics)
                    result.scores[_score_name(s, key)] = float(metrics[key])
                    result.metrics[s.name] = {
                        k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items() if k != "alias"
                    }
                    n = (out.get("n-samples") or {}).get(s.name) or {}
                    if "effective" in n:
                        result.n_samples[s.name] = int(n["effective"])
        finally:
            if was_training:
                model.train()
    result.seconds = time.perf_counter() - t0
    return result


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str | TaskSpec] | str | None = None,
    *,
    preset: str | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> dict[str, float]:
    """Evaluate an in-memory Hugging Face causal LM; return one primary score per task.

    ``tasks`` (names, ``name:shots``) override ``preset`` (``offline`` by
    default).  Keys are ``<task>/<metric>``, e.g. ``ift_arith/exact_match``,
    ``ift_capitals_mc/acc``; values are in [0, 1].  ``limit`` caps the
    examples per task.  The chat template is applied; the model is put in
    eval mode and restored to train mode afterwards if it was training; the
    caller's python/numpy/torch RNG state is preserved.  Hub tasks raise
    :class:`EvalError` when the Hub is unavailable.
    """
    return run_evaluation(
        model, tokenizer, tasks, preset=preset, limit=limit, batch_size=batch_size, max_length=max_length
    ).scores
