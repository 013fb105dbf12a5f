"""``ift eval`` and ``ift compare``: benchmark scores with lm-evaluation-harness, logged to MLflow.

    ift eval MODEL [--preset offline|paper] [--tasks T[:SHOTS] ...] [--limit N]
    ift compare MODEL MODEL ... [--out outputs/compare]
    python -m pipelines.evaluate eval|compare|build-tasks ...

MODEL is an MLflow model URI (``models:/name@alias``, ``models:/name/3``,
``models:/name/latest``, ``runs:/RUN_ID/model``), a local directory (a saved
Hugging Face model or an MLflow model), a built-in preset (``tiny``) or a Hub id.

The model and its tokenizer are loaded in memory and wrapped in lm-eval's
``HFLM`` (the tokenizer is passed explicitly, so nothing is looked up on the
Hub); prompts go through the tokenizer's chat template, as in the paper.

Presets:

- ``offline`` (default): the tasks shipped in ``pipelines/eval_tasks`` (local
  YAML configs + JSONL data, no download): ``ift_arith`` (arithmetic word
  problems, greedy generation, exact match on the final number) and
  ``ift_capitals_mc`` (capital cities, 4-way multiple choice by
  log-likelihood).  Both are learnable by the ``tiny`` preset from the bundled
  training data.
- ``paper``: the paper's Table 3 suite (ARC-Challenge 25-shot, MMLU 5-shot,
  TruthfulQA mc2 0-shot, WinoGrande 5-shot, GSM8K 5-shot).  Their datasets come
  from the Hugging Face Hub, so this fails up front, with a clear message, when
  the Hub is unreachable or ``HF_HUB_OFFLINE`` is set.

Scores (one primary metric per task, named ``<task>/<metric>``) are logged as
metrics ``eval/<task>/<metric>`` on the training run that produced the model
(for ``models:/`` URIs the version's run) or, for models that have no run, on a
new run in the ``ift-eval`` experiment; and as tags ``eval.<task>`` on the
registered model version.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import logging
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "TASKS_DIR",
    "OFFLINE_TASKS",
    "PRESETS",
    "DEFAULT_PRESET",
    "DEFAULT_TRACKING_URI",
    "DEFAULT_COMPARE_OUT",
    "EVAL_EXPERIMENT",
    "METRIC_PREFIX",
    "TAG_PREFIX",
    "EvalError",
    "TaskSpec",
    "ModelSource",
    "EvalResult",
    "resolve_tasks",
    "hub_status",
    "require_hub",
    "check_tasks",
    "local_tasks",
    "resolve_model",
    "run_evaluation",
    "evaluate_model",
    "metric_key",
    "log_scores",
    "comparison_table",
    "build_offline_tasks",
    "offline_task_rows",
    "main_eval",
    "main_compare",
    "main",
]

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_COMPARE_OUT = "outputs/compare"
EVAL_EXPERIMENT = "ift-eval"
METRIC_PREFIX = "eval/"
TAG_PREFIX = "eval."
DEFAULT_BATCH_SIZE = 32


class EvalError(RuntimeError):
    """A problem the user can fix (unknown model, unreachable hub, bad task name)."""


# --------------------------------------------------------------------------- tasks and presets


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task: its name, few-shot count and primary metric.

    ``metric`` is the key in lm-eval's results (``"<metric>,<filter>"``);
    ``None`` picks the first of :data:`_METRIC_PREFERENCE` the task reports.
    """

    name: str
    num_fewshot: int = 0
    metric: str | None = None

    @property
    def offline(self) -> bool:
        """Shipped with the project (``pipelines/eval_tasks``): runs without the Hub."""
        return self.name in local_tasks()


OFFLINE_TASKS: tuple[str, ...] = ("ift_arith", "ift_capitals_mc")

PRESETS: dict[str, tuple[TaskSpec, ...]] = {
    "offline": (
        TaskSpec("ift_arith", 0, "exact_match,final_number"),
        TaskSpec("ift_capitals_mc", 0, "acc,none"),
    ),
    # The paper's Table 3 (Open LLM Leaderboard v1 settings and metrics).
    "paper": (
        TaskSpec("arc_challenge", 25, "acc_norm,none"),
        TaskSpec("mmlu", 5, "acc,none"),
        TaskSpec("truthfulqa_mc2", 0, "acc,none"),
        TaskSpec("winogrande", 5, "acc,none"),
        TaskSpec("gsm8k", 5, "exact_match,strict-match"),
    ),
}
DEFAULT_PRESET = "offline"
_KNOWN_TASKS: dict[str, TaskSpec] = {t.name: t for specs in PRESETS.values() for t in specs}
_METRIC_PREFERENCE = ("acc_norm", "acc", "exact_match", "f1", "bleu", "mc2", "em")

# Column headers of the comparison table (paper Table 3 names where they exist).
DISPLAY_NAMES = {
    "ift_arith": "Arithmetic (EM)",
    "ift_capitals_mc": "Capitals (MC)",
    "arc_challenge": "ARC-Challenge",
    "mmlu": "MMLU",
    "truthfulqa_mc2": "TruthfulQA",
    "winogrande": "WinoGrande",
    "gsm8k": "GSM8K",
}


def _parse_task(text: str) -> TaskSpec:
    name, _, shots = text.strip().partition(":")
    if not name:
        raise EvalError(f"empty task name in {text!r}")
    known = _KNOWN_TASKS.get(name, TaskSpec(name))
    if not shots:
        return known
    try:
        n = int(shots)
    except ValueError:
        raise EvalError(f"task {text!r}: the few-shot count after ':' must be an integer") from None
    if n < 0:
        raise EvalError(f"task {text!r}: the few-shot count must be >= 0")
    return TaskSpec(name, n, known.metric)


def resolve_tasks(tasks: Sequence[str | TaskSpec] | str | None = None, preset: str | None = None) -> list[TaskSpec]:
    """The tasks to run: ``tasks`` if given (names, ``name:shots`` or comma lists), else ``preset``'s.

    With neither, the :data:`DEFAULT_PRESET` (``offline``).
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    if tasks:
        specs: list[TaskSpec] = []
        for t in tasks:
            if isinstance(t, TaskSpec):
                specs.append(t)
            else:
                specs.extend(_parse_task(part) for part in str(t).split(",") if part.strip())
        if not specs:
            raise EvalError("no tasks given")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise EvalError(f"task listed twice: {names}")
        return specs
    preset = preset or DEFAULT_PRESET
    try:
        return list(PRESETS[preset])
    except KeyError:
        raise EvalError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}") from None


def _score_name(spec: TaskSpec, metric_key: str) -> str:
    return f"{spec.name}/{metric_key.split(',')[0]}"


# --------------------------------------------------------------------------- hub access


_TRUE = {"1", "on", "yes", "true"}


def hub_status(timeout: float = 3.0) -> str | None:
    """``None`` if the Hugging Face Hub looks reachable, else the reason it is not."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        req = urllib.request.Request(f"{endpoint}/api/datasets/gsm8k", method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: reachable
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"{endpoint} is unreachable ({reason})"


def require_hub(specs: Sequence[TaskSpec], *, timeout: float = 3.0) -> None:
    """Raise :class:`EvalError` if any task needs the Hub and the Hub is unavailable."""
    hub_tasks = [s.name for s in specs if not s.offline]
    if not hub_tasks:
        return
    why = hub_status(timeout)
    if why is None:
        return
    paper = {s.name for s in PRESETS["paper"]}
    what = "the 'paper' preset tasks" if set(hub_tasks) <= paper else "tasks"
    raise EvalError(
        f"{what} {', '.join(hub_tasks)} download their datasets from the Hugging Face Hub, "
        f"which is not available: {why}.  Run them with Hub access (unset HF_HUB_OFFLINE / "
        f"HF_DATASETS_OFFLINE), or evaluate offline with the shipped tasks: --preset offline "
        f"({', '.join(OFFLINE_TASKS)})."
    )


_TASK_MANAGERS: dict[bool, Any] = {}


def _task_manager(include_defaults: bool) -> Any:
    """lm-eval TaskManager over the shipped tasks (+ lm-eval's own when asked); cached, indexing them takes seconds."""
    if include_defaults not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[include_defaults] = TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)
    return _TASK_MANAGERS[include_defaults]


def local_tasks() -> frozenset[str]:
    """Names of the lm-eval tasks shipped in :data:`TASKS_DIR`."""
    return frozenset(_task_manager(False).all_tasks)


def check_tasks(specs: Sequence[TaskSpec]) -> None:
    """Fail early with :class:`EvalError`: unknown shipped (``ift_*``) tasks, Hub tasks without the Hub, unknown names."""
    local = local_tasks()
    bad_local = [s.name for s in specs if s.name.startswith("ift_") and s.name not in local]
    if bad_local:
        raise EvalError(
            f"unknown offline task(s) {', '.join(bad_local)}; the tasks shipped in {TASKS_DIR} are "
            f"{', '.join(sorted(local))}"
        )
    require_hub(specs)
    unchecked = [s.name for s in specs if s.name not in local and s.name not in _KNOWN_TASKS]
    if unchecked:
        known = set(_task_manager(True).all_tasks)
        missing = [n for n in unchecked if n not in known]
        if missing:
            raise EvalError(
                f"unknown lm-eval task(s): {', '.join(missing)} (see lm-eval's task list; shipped offline tasks: "
                f"{', '.join(sorted(local))})"
            )


# --------------------------------------------------------------------------- model resolution


@dataclass
class ModelSource:
    """Where an evaluated model came from (what :func:`resolve_model` found)."""

    ref: str
    kind: str  # "registered" | "run" | "mlflow_path" | "path" | "preset" | "hub"
    model_uri: str | None = None
    run_id: str | None = None
    registered_model_name: str | None = None
    version: str | None = None
    method: str | None = None
    tracking_uri: str | None = None

    @property
    def label(self) -> str:
        """Row label in ``ift compare``: the training method, else the reference."""
        return self.method or self.ref


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)(?:/(?P<path>.+))?$")


def _check_store(tracking_uri: str) -> None:
    """Refuse a sqlite store that does not exist (MLflow would silently create an empty one)."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///") :])
        if not path.exists():
            raise EvalError(
                f"tracking store {tracking_uri} does not exist (no file {path.resolve()}); "
                "pass --tracking-uri pointing at the store the model was registered in"
            )


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    _check_store(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or (
        "not found" in str(e).lower() or "does not exist" in str(e).lower()
    )


def _list_hint(tracking_uri: str) -> str:
    return f"browse them with: mlflow ui --backend-store-uri {tracking_uri}"


def _registered_version(client: Any, name: str, alias: str | None, version: str | None, tracking_uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise EvalError(
            f"no registered model {name!r} in tracking store {tracking_uri} "
            f"(registered models there: {', '.join(names) or 'none'}); {_list_hint(tracking_uri)}"
        ) from None
    versions = client.search_model_versions(f"name='{name}'")
    have = sorted(int(v.version) for v in versions)
    aliases = getattr(registered, "aliases", None) or {}
    shown = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    what = f"versions {', '.join(map(str, have)) or 'none'}; aliases {shown}"
    if alias is not None:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            if not _not_found(e):
                raise
            raise EvalError(
                f"registered model {name!r} has no alias {alias!r} in tracking store {tracking_uri} "
                f"(it has {what}); {_list_hint(tracking_uri)}"
            ) from None
    assert version is not None
    if version.lower() == "latest":
        if not have:
            raise EvalError(f"registered model {name!r} has no versions in tracking store {tracking_uri}")
        version = str(have[-1])
    if not version.isdigit():
        raise EvalError(
            f"models:/{name}/{version}: expected a version number, 'latest' or models:/{name}@alias "
            f"(model stages are deprecated in MLflow); {name!r} has {what}"
        )
    try:
        return client.get_model_version(name, version)
    except MlflowException as e:
        if not _not_found(e):
            raise
        raise EvalError(
            f"registered model {name!r} has no version {version} in tracking store {tracking_uri} "
            f"(it has {what}); {_list_hint(tracking_uri)}"
        ) from None


def _method_of_run(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - the label is a nicety
        return None
    tags, params = run.data.tags, run.data.params
    return tags.get("method") or params.get("method.name") or params.get("method")


def _load_mlflow_components(uri: str, tracking_uri: str | None) -> tuple[Any, Any]:
    import mlflow

    from pipelines.tracking import mlflow_store

    ctx = mlflow_store(tracking_uri) if tracking_uri else contextlib.nullcontext()
    try:
        with ctx:
            parts = mlflow.transformers.load_model(uri, return_type="components")
    except EvalError:
        raise
    except Exception as e:  # noqa: BLE001 - mlflow raises many types; say which model failed
        raise EvalError(f"could not load the transformers model at {uri}: {type(e).__name__}: {e}") from e
    if "model" not in parts or "tokenizer" not in parts:
        raise EvalError(f"{uri} is not a text-generation model with a tokenizer (components: {sorted(parts)})")
    return parts["model"], parts["tokenizer"]


def _prepare(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    from ift.models import ensure_pad_and_template

    ensure_pad_and_template(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def resolve_model(
    ref: str,
    *,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[Any, Any, ModelSource]:
    """Load ``ref`` -> ``(model, tokenizer, ModelSource)``; a reference that does not exist is an :class:`EvalError`.

    ``ref``: ``models:/name@alias``, ``models:/name/<version>|latest``,
    ``runs:/<run_id>/<path>`` (loaded with ``mlflow.transformers.load_model``
    from the store at ``tracking_uri``); a local directory (an MLflow model if
    it holds an ``MLmodel`` file, else a saved Hugging Face model); a preset of
    :mod:`ift.models` (``tiny``: random init with ``seed``); otherwise a Hub id.
    """
    from ift import models as ift_models

    m = _MODELS_URI.match(ref)
    if ref.startswith("models:/"):
        if not m:
            raise EvalError(f"cannot parse model URI {ref!r}; expected models:/NAME@ALIAS or models:/NAME/VERSION")
        client = _client(tracking_uri)
        mv = _registered_version(client, m["name"], m["alias"], m["version"], tracking_uri)
        uri = f"models:/{mv.name}/{mv.version}"
        model, tok = _load_mlflow_components(uri, tracking_uri)
        method = (mv.tags or {}).get("method") or _method_of_run(client, mv.run_id)
        src = ModelSource(ref, "registered", uri, mv.run_id, mv.name, str(mv.version), method, tracking_uri)
        return (*_prepare(model, tok), src)

    if ref.startswith("runs:/"):
        r = _RUNS_URI.match(ref)
        if not r:
            raise EvalError(f"cannot parse run URI {ref!r}; expected runs:/RUN_ID/ARTIFACT_PATH")
        from mlflow.exceptions import MlflowException

        client = _client(tracking_uri)
        try:
            client.get_run(r["run_id"])
        except MlflowException as e:
            if not _not_found(e):
                raise
            raise EvalError(f"no run {r['run_id']!r} in tracking store {tracking_uri}") from None
        uri = ref if r["path"] else f"runs:/{r['run_id']}/model"
        model, tok = _load_mlflow_components(uri, tracking_uri)
        src = ModelSource(ref, "run", uri, r["run_id"], method=_method_of_run(client, r["run_id"]), tracking_uri=tracking_uri)
        return (*_prepare(model, tok), src)

    path = Path(ref).expanduser()
    if path.exists():
        if (path / "MLmodel").is_file():
            model, tok = _load_mlflow_components(str(path.resolve()), None)
            return (*_prepare(model, tok), ModelSource(ref, "mlflow_path", str(path.resolve())))
        if not path.is_dir():
            raise EvalError(f"{ref!r} is a file; expected a model directory")
        try:
            tok = ift_models.load_tokenizer(str(path))
            model = ift_models.load_model(str(path), dtype=dtype, tokenizer=tok)
        except (OSError, ValueError) as e:
            raise EvalError(f"could not load a causal LM from directory {ref!r}: {e}") from e
        return (*_prepare(model, tok), ModelSource(ref, "path", str(path.resolve())))

    if ift_models.is_preset(ref):
        tok = ift_models.load_tokenizer(ref)
        model = ift_models.load_model(ref, dtype=dtype, seed=seed, tokenizer=tok)
        return (*_prepare(model, tok), ModelSource(ref, "preset", ref))

    if "://" in ref or ref.startswith(("/", ".", "~")):
        raise EvalError(
            f"{ref!r} is neither an MLflow URI (models:/..., runs:/...), an existing local path, "
            f"a preset ({', '.join(ift_models.MODEL_PRESETS)}) nor a Hugging Face Hub id"
        )
    try:
        tok = ift_models.load_tokenizer(ref)
        model = ift_models.load_model(ref, dtype=dtype, tokenizer=tok)
    except (OSError, ValueError) as e:
        why = hub_status()
        extra = f" (the Hub is not available: {why})" if why else ""
        raise EvalError(
            f"{ref!r} is not an MLflow URI, a local path or a preset, and loading it as a Hugging Face "
            f"Hub id failed{extra}: {e}"
        ) from e
    return (*_prepare(model, tok), ModelSource(ref, "hub", ref))


# --------------------------------------------------------------------------- evaluation


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
    import numpy as np
    import torch

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

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from ift.models import ensure_pad_and_template

    ensure_pad_and_template(tokenizer)
    needs_hub_tasks = any(not s.offline for s in specs)
    t0 = time.perf_counter()
    was_training = bool(getattr(model, "training", False))
    result = EvalResult({}, limit=limit)
    with _quiet_lm_eval(quiet), _preserved_rng(getattr(model, "device", None)):
        task_manager = _task_manager(needs_hub_tasks)
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
                    task_manager=task_manager,
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
                        k: (float(v) if isinstance(v, (int, float)) else v)
                        for k, v in metrics.items()
                        if k != "alias"
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


# --------------------------------------------------------------------------- MLflow


def metric_key(score_name: str) -> str:
    """MLflow metric name of a score: ``ift_arith/exact_match`` -> ``eval/ift_arith/exact_match``."""
    return METRIC_PREFIX + score_name


def _tag_key(score_name: str) -> str:
    return TAG_PREFIX + score_name.split("/")[0]


def log_scores(
    scores: dict[str, float],
    *,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    model_uri: str | None = None,
    run_id: str | None = None,
    registered_model_name: str | None = None,
    version: str | int | None = None,
    limit: int | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """Log ``scores`` to MLflow; return where they went (``run_id``, ``created_run``, ``registered_model_name``, ``version``).

    - Metrics ``eval/<task>/<metric>`` go on ``run_id``; if it is not given
      they go on the run that produced ``model_uri`` (for ``models:/`` URIs
      the version's run, for ``runs:/`` URIs that run); if there is none
      (local path, preset, Hub id), on a new run in the ``ift-eval``
      experiment, tagged with the model reference.
    - Tags ``eval.<task>`` (the score, 4 decimals) plus ``eval.limit`` go on
      the registered model version (given, or resolved from a ``models:/`` URI).
    """
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    refers_to_store = run_id is not None or registered_model_name is not None or (
        model_uri is not None and model_uri.startswith(("models:/", "runs:/"))
    )
    if refers_to_store:
        _check_store(tracking_uri)  # the run/version must already be there
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    if model_uri and model_uri.startswith("models:/") and (registered_model_name is None or version is None):
        m = _MODELS_URI.match(model_uri)
        if not m:
            raise EvalError(f"cannot parse model URI {model_uri!r}")
        mv = _registered_version(client, m["name"], m["alias"], m["version"], tracking_uri)
        registered_model_name, version = mv.name, mv.version
        run_id = run_id or mv.run_id
    elif model_uri and model_uri.startswith("runs:/") and run_id is None:
        r = _RUNS_URI.match(model_uri)
        run_id = r["run_id"] if r else None
    if run_id is None and registered_model_name is not None and version is not None:
        run_id = client.get_model_version(registered_model_name, str(version)).run_id or None

    created = False
    if run_id is None:
        from pipelines.tracking import experiment_id

        exp_id = experiment_id(client, EVAL_EXPERIMENT, tracking_uri)
        ref = model_uri or "<in-memory model>"
        run = client.create_run(exp_id, run_name=f"eval {ref}"[:250], tags={"ift.model_ref": ref})
        run_id, created = run.info.run_id, True

    ts = int(time.time() * 1000)
    metrics = [Metric(metric_key(k), float(v), ts, step or 0) for k, v in scores.items()]
    tags = [RunTag("eval.tasks", ",".join(k.split("/")[0] for k in scores)), RunTag("eval.limit", str(limit))]
    if model_uri:
        tags.append(RunTag("eval.model_uri", model_uri))
    client.log_batch(run_id, metrics=metrics, tags=tags)
    if created:
        client.set_terminated(run_id)
    if registered_model_name is not None and version is not None:
        for k, v in scores.items():
            client.set_model_version_tag(registered_model_name, str(version), _tag_key(k), f"{float(v):.4f}")
        client.set_model_version_tag(registered_model_name, str(version), "eval.limit", str(limit))
    return {
        "run_id": run_id,
        "created_run": created,
        "registered_model_name": registered_model_name,
        "version": None if version is None else str(version),
        "tracking_uri": tracking_uri,
    }


# --------------------------------------------------------------------------- tables


def _task_of(score_name: str) -> str:
    return score_name.split("/")[0]


def comparison_table(rows: Sequence[tuple[str, str, dict[str, float]]]) -> tuple[list[str], list[list[str]]]:
    """``(label, ref, scores)`` rows -> ``(header, cells)`` in the paper's Table 3 layout.

    One row per model, one column per task (scores in percent, 2 decimals),
    then the average over the tasks.  Labels that repeat (two models trained
    with the same method) get their reference appended.
    """
    tasks: list[str] = []
    for _, _, scores in rows:
        for k in scores:
            if k not in tasks:
                tasks.append(k)
    labels = [label for label, _, _ in rows]
    header = ["method", "model", *tasks, "average"]
    cells = []
    for label, ref, scores in rows:
        if labels.count(label) > 1 and label != ref:
            label = f"{label} ({ref})"
        vals = [scores.get(t) for t in tasks]
        present = [v for v in vals if v is not None]
        avg = sum(present) / len(present) if present else None
        cells.append([label, ref, *(_pct(v) for v in vals), _pct(avg)])
    return header, cells


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _display(col: str) -> str:
    if col in ("method", "model"):
        return col.capitalize()
    if col == "average":
        return "Average"
    return DISPLAY_NAMES.get(_task_of(col), col)


def _markdown(header: list[str], cells: list[list[str]]) -> str:
    head = "| " + " | ".join(_display(h) for h in header) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"
    return "\n".join([head, sep, *("| " + " | ".join(c) + " |" for c in cells)])


def _plain(header: list[str], cells: list[list[str]]) -> str:
    shown = [_display(h) for h in header]
    widths = [max(len(r[i]) for r in [shown, *cells]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(shown), "  ".join("-" * w for w in widths), *(line(c) for c in cells)])


# --------------------------------------------------------------------------- offline task data

ARITH_SEED = 7001  # the bundled training/validation data use seeds 0-2 and 1000-1002
ARITH_N = 200
CAPITALS_SEED = 7002
CAPITALS_PHRASINGS = (
    # The training data's three wordings (ift.toydata._capital_task).
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "Name the capital city of {country}.",
)


def _bundled_questions() -> set[str]:
    from ift import toydata

    seen: set[str] = set()
    for fn, n, seed in toydata.BUNDLED_FILES.values():
        for row in fn(n, seed):
            for conv in (row.get("messages"), row.get("chosen")):
                seen.update(m["content"] for m in conv or () if m["role"] == "user")
    return seen


def offline_task_rows() -> dict[str, list[dict[str, Any]]]:
    """The shipped offline tasks' data, generated deterministically.

    - ``ift_arith``: :data:`ARITH_N` problems from
      :func:`ift.toydata.arithmetic_problem` with seed :data:`ARITH_SEED`,
      skipping questions that occur in the bundled data files (held out);
    - ``ift_capitals_mc``: every country of :func:`ift.toydata.capital_facts`
      in the training data's three wordings, with the right answer and three
      other countries' capitals as whole-sentence choices in a shuffled order.
    """
    from ift import toydata

    rng = random.Random(ARITH_SEED)
    held_out = _bundled_questions()
    arith: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(arith) < ARITH_N:
        q, solution, answer = toydata.arithmetic_problem(rng)
        if q in held_out or q in seen:
            continue
        seen.add(q)
        arith.append({"question": q, "answer": str(answer), "solution": solution})

    rng = random.Random(CAPITALS_SEED)
    facts = toydata.capital_facts()
    caps: list[dict[str, Any]] = []
    for phrasing in CAPITALS_PHRASINGS:
        for i, (country, capital) in enumerate(facts):
            others = [c for j, (_, c) in enumerate(facts) if j != i]
            options = [capital, *rng.sample(others, 3)]
            rng.shuffle(options)
            caps.append(
                {
                    "question": phrasing.format(country=country),
                    "choices": [f"The capital of {country} is {c}." for c in options],
                    "label": options.index(capital),
                    "country": country,
                }
            )
    return {"ift_arith": arith, "ift_capitals_mc": caps}


def build_offline_tasks(out_dir: str | Path = TASKS_DIR) -> list[Path]:
    """Write the offline tasks' JSONL files (byte-identical on every run); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in offline_task_rows().items():
        path = out / f"{name}.jsonl"
        with path.open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- CLI


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK[:SHOTS]",
        help="lm-eval tasks (space or comma separated; ':N' sets the few-shot count); overrides --preset",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help="offline: the shipped tasks (no download); paper: the paper's Table 3 suite (needs the Hub)",
    )
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow store of models:/ and runs:/ URIs")
    p.add_argument("--seed", type=int, default=0, help="init seed for presets such as 'tiny'")
    p.add_argument("--no-log", action="store_true", help="do not log the scores to MLflow")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lm_eval", "mlflow", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _eval_one(ref: str, args: argparse.Namespace) -> tuple[ModelSource, EvalResult, dict[str, Any] | None]:
    specs = resolve_tasks(args.tasks, args.preset)
    check_tasks(specs)  # before loading anything
    model, tok, src = resolve_model(ref, tracking_uri=args.tracking_uri, seed=args.seed)
    try:
        res = run_evaluation(model, tok, specs, limit=args.limit, batch_size=args.batch_size, check=False)
    finally:
        del model
        gc.collect()
    logged = None
    if not args.no_log:
        logged = log_scores(
            res.scores,
            tracking_uri=args.tracking_uri,
            model_uri=src.model_uri if src.kind in ("registered", "run") else ref,
            run_id=src.run_id,
            registered_model_name=src.registered_model_name,
            version=src.version,
            limit=args.limit,
        )
    return src, res, logged


def _logged_line(logged: dict[str, Any] | None) -> str:
    if logged is None:
        return "not logged to MLflow (--no-log)"
    where = f"metrics eval/* on {'new eval ' if logged['created_run'] else ''}run {logged['run_id']}"
    if logged["version"] is not None:
        where += f", tags eval.* on registered model {logged['registered_model_name']!r} version {logged['version']}"
    return f"logged {where} in {logged['tracking_uri']}"


def _describe(src: ModelSource) -> str:
    bits = [src.ref]
    if src.version is not None and src.ref != src.model_uri:
        bits.append(f"= {src.model_uri}")
    extra = [f"method {src.method}"] if src.method else []
    if src.run_id:
        extra.append(f"run {src.run_id}")
    return " ".join(bits) + (f" ({', '.join(extra)})" if extra else "")


def main_eval(argv: Sequence[str] | None = None) -> int:
    """``ift eval MODEL [--tasks ...] [--preset ...] [--limit N]``: print the scores and log them to MLflow."""
    p = argparse.ArgumentParser(prog="ift eval", description="Benchmark a model with lm-evaluation-harness.")
    p.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a path, a preset or a Hub id")
    _common_args(p)
    p.add_argument("--out", default=None, help="also write the scores to DIR/scores.json")
    args = p.parse_args(argv)
    _setup_logging()
    try:
        src, res, logged = _eval_one(args.model, args)
    except EvalError as e:
        print(f"ift eval: error: {e}", file=sys.stderr)
        return 2
    print(f"model: {_describe(src)}")
    width = max(len(k) for k in res.scores)
    for k, v in res.scores.items():
        n = res.n_samples.get(_task_of(k))
        print(f"  {k.ljust(width)}  {v:.4f}" + (f"  (n={n})" if n is not None else ""))
    if res.scores:
        print(f"  {'average'.ljust(width)}  {sum(res.scores.values()) / len(res.scores):.4f}")
    print(f"({res.seconds:.1f} s)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"model": args.model, "source": src.__dict__, "scores": res.scores, "metrics": res.metrics,
                   "n_samples": res.n_samples, "limit": args.limit}
        (out / "scores.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {out / 'scores.json'}")
    print(_logged_line(logged))
    return 0


def main_compare(argv: Sequence[str] | None = None) -> int:
    """``ift compare MODEL MODEL ...``: the paper's Table 3 layout, printed and written as CSV + Markdown."""
    p = argparse.ArgumentParser(
        prog="ift compare", description="Evaluate several models and tabulate the scores side by side."
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="as for ift eval")
    _common_args(p)
    p.add_argument("--out", default=DEFAULT_COMPARE_OUT, help="writes comparison.csv and comparison.md here")
    args = p.parse_args(argv)
    _setup_logging()
    rows: list[tuple[str, str, dict[str, float]]] = []
    try:
        check_tasks(resolve_tasks(args.tasks, args.preset))
        for ref in args.models:
            src, res, logged = _eval_one(ref, args)
            rows.append((src.label, ref, res.scores))
            print(f"{_describe(src)}: " + ", ".join(f"{k} {v:.4f}" for k, v in res.scores.items())
                  + f" ({res.seconds:.1f} s); {_logged_line(logged)}")
    except EvalError as e:
        print(f"ift compare: error: {e}", file=sys.stderr)
        return 2
    header, cells = comparison_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "comparison.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(cells)
    limit = f", at most {args.limit} examples per task" if args.limit else ""
    md = (
        "# Model comparison\n\n"
        f"Scores in percent (lm-evaluation-harness, chat template applied{limit}); "
        "Average is the mean over the task columns.\n\n" + _markdown(header, cells) + "\n"
    )
    (out / "comparison.md").write_text(md, encoding="utf-8")
    print()
    print(_plain(header, cells))
    print()
    print(f"results written to {out / 'comparison.csv'} and {out / 'comparison.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.evaluate eval|compare|build-tasks ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"eval": main_eval, "compare": main_compare}
    if argv and argv[0] == "build-tasks":
        for path in build_offline_tasks(argv[1] if len(argv) > 1 else TASKS_DIR):
            print(path)
        return 0
    if not argv or argv[0] not in commands:
        print("usage: python -m pipelines.evaluate {eval,compare,build-tasks} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
