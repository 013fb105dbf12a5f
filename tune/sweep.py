"""`ift sweep`: a Ray Tune search over the training config, one Ray Train run per trial.

How a sweep runs
----------------
* A ``ray.tune.Tuner`` runs :func:`_trial`, a small driver function, once per
  sampled config.  The driver applies the sampled values to the base
  :class:`~pipelines.config.TrainConfig` and calls :func:`pipelines.train.train`,
  the body of ``ift train``: the same Ray Data preparation, the same
  ``TorchTrainer`` + DeepSpeed loop, the same MLflow run (nested under the
  sweep's parent run).  This is the Ray Train V2 recipe: a Tuner over a driver
  function that launches a ``TorchTrainer`` whose ``RunConfig`` carries a
  ``TuneReportCallback``.
* Rank 0 reports ``val_nll``/``val_loss`` at evaluation steps
  (``optimization.eval_every_n_steps``); :class:`_ReportEvaluations` forwards
  those reports to Tune, where ASHA compares trials at ``step`` milestones.
* Trials stopped by ASHA leave their Ray Train placement group behind (the Train
  controller is killed with the trial; Ray's own cleaner needs the state API,
  which a local cluster without the dashboard does not serve).
  :class:`_PlacementGroupJanitor` removes the placement group of every dead
  controller, so the next trial gets the CPUs.
* After the Tuner: one results row per trial (CSV), a lambda x decay heatmap,
  child runs marked FINISHED / KILLED (early stopped) / FAILED, and the best
  *completed* trial's model registered with the alias ``champion``.

Config
------
A sweep file is YAML with ``train_config`` (a packaged training config or a
path), ``overrides`` (training keys for every trial) and a ``sweep:`` section
(:class:`SweepConfig`).  ``ift sweep`` with no arguments runs the packaged
``tune/configs/tiny-sweep.yaml``; ``ift sweep TRAIN.yaml`` sweeps that training
config with the default sweep settings.  See ``docs/sweeps.md``.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the Tuner-over-TorchTrainer recipe below is V2's

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.config import (
    ConfigError,
    TrainConfig,
    _allowed_keys,
    _format_validation_error,
    _set_dotted,
    apply_overrides,
    load_config,
    packaged_config_path,
    parse_overrides,
    read_yaml_mapping,
)

PACKAGED_SWEEPS = "tune.configs"
DEFAULT_SWEEP = "tiny-sweep"
HEATMAP_X, HEATMAP_Y = "method.lam", "method.decay"
SWEEP_TAG = "ift.sweep"
COMPLETED, STOPPED, ERROR = "COMPLETED", "STOPPED", "ERROR"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- schema


class ParamSpec(_Strict):
    """One dimension of the search space."""

    type: Literal["uniform", "loguniform", "randint", "choice", "grid"] = Field(
        ..., description="uniform/loguniform/randint: a range; choice: sampled from values; grid: every value."
    )
    low: float | None = Field(None, description="Range start (randint: inclusive).")
    high: float | None = Field(None, description="Range end (randint: inclusive).")
    values: list[Any] | None = Field(None, description="The values of a choice or grid dimension.")
    grid_points: int = Field(3, ge=1, description="Points a range is cut into under algorithm=grid.")

    @model_validator(mode="after")
    def _check(self) -> "ParamSpec":
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"a '{self.type}' dimension needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a '{self.type}' dimension needs 'low' and 'high'")
            if self.high < self.low:
                raise ValueError(f"high ({self.high}) is below low ({self.low})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("a loguniform dimension needs low > 0")
        return self

    def grid_values(self) -> list[Any]:
        """The values this dimension takes under ``algorithm: grid``."""
        import numpy as np

        if self.type in ("choice", "grid"):
            return list(self.values or [])
        n = self.grid_points
        if self.type == "randint":
            return sorted({int(round(v)) for v in np.linspace(self.low, self.high, n)})
        pts = np.geomspace(self.low, self.high, n) if self.type == "loguniform" else np.linspace(self.low, self.high, n)
        return [round(float(v), 10) for v in pts]

    def tune_domain(self, algorithm: str):
        from ray import tune as rtune

        if algorithm == "grid":
            return rtune.grid_search(self.grid_values())
        if self.type == "grid":
            if algorithm == "optuna":
                raise ConfigError("optuna cannot enumerate a 'grid' dimension; use type: choice")
            return rtune.grid_search(list(self.values or []))
        if self.type == "choice":
            return rtune.choice(list(self.values or []))
        if self.type == "uniform":
            return rtune.uniform(self.low, self.high)
        if self.type == "loguniform":
            return rtune.loguniform(self.low, self.high)
        return rtune.randint(int(self.low), int(self.high) + 1)  # Tune's upper bound is exclusive

    def describe(self) -> str:
        if self.type in ("choice", "grid"):
            return f"{self.type}({', '.join(map(str, self.values or []))})"
        return f"{self.type}({self.low:g}, {self.high:g})"


# The default search space: IFT's lambda of eq. (17) and the propagation decay.
DEFAULT_SPACE: dict[str, ParamSpec] = {
    "method.lam": ParamSpec(type="uniform", low=0.0, high=0.5),
    "method.decay": ParamSpec(type="uniform", low=0.8, high=1.0),
}


class SchedulerConfig(_Strict):
    type: Literal["asha", "none"] = Field("asha", description="ASHA early stopping, or none (run every trial out).")
    time_attr: Literal["step", "training_iteration"] = Field(
        "step", description="ASHA's clock: optimizer steps, or evaluations reported so far."
    )
    grace_period: int | None = Field(
        None, gt=0, description="No trial stops before this (default: the first evaluation)."
    )
    reduction_factor: float = Field(2.0, gt=1, description="Keep the best 1/reduction_factor at each rung.")
    max_t: int | None = Field(
        None, gt=0, description="Longest trial in time_attr units (default: optimization.max_steps)."
    )


class SweepConfig(_Strict):
    name: str = Field("sweep", description="Prefix of the sweep id, the parent run name and trial run names.")
    algorithm: Literal["grid", "random", "optuna"] = Field("random", description="grid, random, or Optuna TPE.")
    search_space: dict[str, ParamSpec | None] = Field(
        default_factory=dict,
        description="Dotted training keys -> ParamSpec, merged into the default lam/decay space (null removes a key).",
    )
    num_samples: int | None = Field(
        None, gt=0, description="Trials to sample (grid: repeats of the whole grid). Default 1 for grid, else 8."
    )
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="Trials at once (default: as many worker groups as the cluster's CPUs/GPUs hold)."
    )
    metric: str = Field("val_nll", description="Reported metric that ASHA and the champion choice use.")
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher metric is better.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    seed: int = Field(0, description="Seed of the search algorithm (random/optuna sampling).")
    driver_cpus: float = Field(
        0.0, ge=0, description="CPUs reserved for each trial's driver (the TorchTrainer workers reserve their own)."
    )
    driver_memory_mb: float = Field(
        64, gt=0, description="Memory reserved for each trial's driver (a bundle needs some resource)."
    )
    storage_path: str | None = Field(
        None, description="Sweep results root (default: <checkpointing.storage_path>/sweeps)."
    )
    registered_model_name: str | None = Field(
        None, description="Register the champion under this name (default: mlflow.registered_model_name)."
    )
    alias: str = Field("champion", description="MLflow alias set on the best trial's model version.")

    def space(self) -> dict[str, ParamSpec]:
        merged: dict[str, ParamSpec | None] = {**DEFAULT_SPACE, **self.search_space}
        return {k: v for k, v in merged.items() if v is not None}

    def resolved_num_samples(self) -> int:
        return self.num_samples or (1 if self.algorithm == "grid" else 8)


class SweepFile(_Strict):
    train_config: str | None = Field(None, description="Training config: packaged name or path (relative to the file).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Training keys set for every trial.")
    sweep: SweepConfig = Field(default_factory=SweepConfig)


# --------------------------------------------------------------------------- loading


def packaged_sweep_path(name: str) -> Path:
    return Path(str(resources.files(PACKAGED_SWEEPS).joinpath(f"{name}.yaml")))


def packaged_sweep_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(PACKAGED_SWEEPS).iterdir() if p.name.endswith(".yaml"))


def _find_yaml(path: str) -> Path:
    file = Path(path)
    if file.exists():
        return file
    if file.suffix == "":
        for candidate in (packaged_sweep_path(path), packaged_config_path(path)):
            if candidate.exists():
                return candidate
    raise ConfigError(
        f"config file '{path}' not found; packaged sweeps: {', '.join(packaged_sweep_names())} "
        f"(training configs: `ift configs`)"
    )


def parse_space_item(item: str) -> tuple[str, dict | None]:
    """``method.lam=uniform(0,0.5)`` / ``optimization.lr=loguniform(1e-4,1e-2)`` /
    ``method.name=choice(ift,sft)`` / ``x=grid(1,2,3)`` / ``method.decay=none`` (drop)."""
    if "=" not in item:
        raise ConfigError(f"--space '{item}' is not KEY=SPEC (e.g. method.lam=uniform(0,0.5))")
    key, spec = (s.strip() for s in item.split("=", 1))
    if spec.lower() in ("none", "null", "off"):
        return key, None
    m = re.fullmatch(r"(uniform|loguniform|randint|choice|grid)\((.*)\)", spec)
    if not m:
        raise ConfigError(
            f"--space {key}: '{spec}' is not one of uniform(lo,hi[,grid_points]), loguniform(lo,hi[,n]), "
            "randint(lo,hi[,n]), choice(a,b,...), grid(a,b,...), none"
        )
    kind, raw = m.group(1), m.group(2)
    args = [yaml.safe_load(a.strip()) for a in raw.split(",") if a.strip()]
    if kind in ("choice", "grid"):
        return key, {"type": kind, "values": args}
    if len(args) not in (2, 3):
        raise ConfigError(f"--space {key}: {kind} takes low, high and optionally grid_points")
    out = {"type": kind, "low": float(args[0]), "high": float(args[1])}
    if len(args) == 3:
        out["grid_points"] = int(args[2])
    return key, out


def _check_space_keys(base: TrainConfig, space: dict[str, ParamSpec]) -> None:
    """Every searched key must be a training config key (a typo fails before Ray starts)."""
    tree = base.model_dump(mode="python")
    for key in space:
        node: Any = tree
        for i, part in enumerate(key.split(".")):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                names = list(node) if isinstance(node, dict) else []
                close = difflib.get_close_matches(part, names, n=1)
                prefix = ".".join(key.split(".")[:i])
                hint = f" (did you mean '{'.'.join(filter(None, [prefix, close[0]]))}'?)" if close else ""
                raise ConfigError(f"search space: '{key}' is not a training config key{hint}")
        if isinstance(node, (dict, list)):
            raise ConfigError(f"search space: '{key}' is a section, not a value")


def _absolute_data_paths(cfg: TrainConfig) -> TrainConfig:
    """Relative data paths (from key=value overrides) resolve against the cwd, once, here:
    trial drivers run in their trial directory."""
    values = {}
    for split in ("train", "validation"):
        for i, src in enumerate(getattr(cfg.data, split)):
            p = src.path
            if not (p.startswith("hf:") or "://" in p or os.path.isabs(p)) and (
                os.path.exists(p) or any(ch in p for ch in "*?[")
            ):
                values[f"data.{split}.{i}.path"] = os.path.abspath(p)
    return apply_overrides(cfg, values) if values else cfg


def load_sweep(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    algorithm: str | None = None,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    space: list[str] | None = None,
) -> tuple[SweepConfig, TrainConfig]:
    """Resolve a sweep: the sweep settings and the base training config of every trial.

    ``path`` is a sweep file (YAML with a ``sweep:`` section), a training config
    (swept with the default settings), or a packaged name; ``None`` is the
    packaged ``tiny-sweep``.  ``overrides`` are ``key=value`` items: ``sweep.*``
    keys set sweep settings, all others training keys (applied after the
    file's ``overrides``).
    """
    file = _find_yaml(str(path) if path is not None else DEFAULT_SWEEP)
    tree = read_yaml_mapping(file)

    if "sweep" in tree:  # a sweep file
        sweep_tree: dict[str, Any] = {k: v for k, v in tree.items()}
        sweep_tree["sweep"] = dict(tree.get("sweep") or {})
        train_ref = tree.get("train_config")
        if isinstance(train_ref, str) and not os.path.isabs(train_ref) and (file.parent / train_ref).exists():
            sweep_tree["train_config"] = str(file.parent / train_ref)
    else:  # a training config: default sweep settings
        sweep_tree = {"train_config": str(file), "overrides": {}, "sweep": {}}

    train_items: list[tuple[str, Any]] = []
    for key, value in parse_overrides(overrides or []):
        if key.startswith("sweep."):
            try:
                _set_dotted(sweep_tree, key, value)
            except (IndexError, ValueError, TypeError) as exc:
                raise ConfigError(f"override {key}: {exc}") from exc
        else:
            train_items.append((key, value))
    s = sweep_tree["sweep"]
    if algorithm is not None:
        s["algorithm"] = algorithm
    if num_samples is not None:
        s["num_samples"] = num_samples
    if max_concurrent is not None:
        s["max_concurrent_trials"] = max_concurrent
    for item in space or []:
        key, spec = parse_space_item(item)
        s.setdefault("search_space", {})
        s["search_space"] = {**(s["search_space"] or {}), key: spec}

    try:
        sf = SweepFile.model_validate(sweep_tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(file), _allowed_keys(SweepFile))) from None

    base = load_config(sf.train_config, None)
    merged = {**sf.overrides, **dict(train_items)}
    if merged:
        base = apply_overrides(base, merged)
    base = _absolute_data_paths(base)
    check_sweep(sf.sweep, base)
    return sf.sweep, base


def check_sweep(sweep: SweepConfig, base: TrainConfig) -> None:
    """Combinations that cannot work, named before any trial starts."""
    _check_space_keys(base, sweep.space())
    if not base.mlflow.enabled:
        raise ConfigError("a sweep records its trials in MLflow: mlflow.enabled must be true")
    if sweep.metric in ("val_nll", "val_loss") and not (base.data.validation or base.data.validation_fraction > 0):
        raise ConfigError(
            f"metric {sweep.metric} needs validation data: set data.validation or data.validation_fraction"
        )
    if sweep.scheduler.type == "asha" and sweep.metric.startswith("val_") and not base.optimization.eval_every_n_steps:
        raise ConfigError(
            "ASHA compares trials at evaluation steps, but optimization.eval_every_n_steps is 0 "
            "(validation only at the end); set it, e.g. optimization.eval_every_n_steps=5, "
            "or sweep.scheduler.type=none"
        )
    if sweep.algorithm == "optuna":
        for key, spec in sweep.space().items():
            if spec.type == "grid":
                raise ConfigError(f"search space {key}: optuna cannot enumerate a grid; use type: choice")


# --------------------------------------------------------------------------- in the trial


def _plain(value: Any) -> Any:
    """numpy scalars (from Tune's samplers) -> Python values the config validates."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def _report_callback_cls():
    from ray.tune.integration.ray_train import TuneReportCallback

    class _ReportEvaluations(TuneReportCallback):
        """TuneReportCallback that forwards only the reports carrying the sweep metric.

        Rank 0 also reports training loss at log steps; Tune requires the
        metric in every result, and ASHA should only see evaluations.
        """

        def __init__(self, metric: str):
            super().__init__()
            self._metric = metric

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and self._metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return _ReportEvaluations


def _placement_group_recorder(registry, trial_id: str):
    """A Ray Train controller callback that tells the janitor which placement group
    (and which controller) belongs to this trial.  Ray Train accepts internal
    controller callbacks in ``RunConfig.callbacks`` for workarounds like this one."""
    try:
        from ray.train.v2._internal.execution.callback import WorkerGroupCallback
    except ImportError:  # a Ray without Train V2 internals: no janitor
        return None

    class _RecordPlacementGroup(WorkerGroupCallback):
        def __init__(self, registry, trial_id: str):
            self._registry = registry
            self._trial_id = trial_id

        def after_worker_group_start(self, worker_group) -> None:
            import ray

            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                controller = ray.get_runtime_context().current_actor
                ray.get(self._registry.add.remote(self._trial_id, controller, pg, _ray_cleaner_actor()), timeout=10)
            except Exception as exc:  # best effort: never fail training over bookkeeping
                print(f"[sweep] could not record the placement group of trial {self._trial_id}: {exc}")

    return _RecordPlacementGroup(registry, trial_id)


def _ray_cleaner_actor():
    """The detached ``PlacementGroupCleaner`` Ray Train started for this controller, if any.

    Runs inside the controller process, whose one ``PlacementGroupCleanerCallback``
    holds the handle.  Without the state API (a local cluster without the
    dashboard) that cleaner can never tell that its controller died: it polls
    and logs a warning every second for the life of the cluster.  The janitor
    stops it once it has released the placement group in its stead.
    """
    import gc

    for obj in gc.get_objects():
        if type(obj).__name__ == "PlacementGroupCleanerCallback":
            return getattr(obj, "_cleaner", None)
    return None


def trial_run_name(sweep_id: str, trial_id: str) -> str:
    return f"{sweep_id}-{trial_id}"


def _trial(config: dict[str, Any], *, base: dict, sweep_id: str, parent_run_id: str, trials_dir: str,
           metric: str, registry) -> None:
    """One trial: ``ift train`` with the sampled values, its MLflow run nested under the sweep's."""
    import ray.data
    from ray import tune as rtune

    from pipelines.train import train

    # Several trials prepare data at once: their Ray Data bars would interleave on the console.
    ray.data.DataContext.get_current().enable_progress_bars = False
    trial_id = rtune.get_context().get_trial_id()
    values = {k: _plain(v) for k, v in config.items()}
    values["run_name"] = trial_run_name(sweep_id, trial_id)
    values["checkpointing.storage_path"] = trials_dir
    cfg = apply_overrides(TrainConfig.model_validate(base), values)
    callbacks: list = [_report_callback_cls()(metric)]
    recorder = _placement_group_recorder(registry, trial_id) if registry is not None else None
    if recorder is not None:
        callbacks.append(recorder)
    train(cfg, parent_run_id=parent_run_id, show_progress=False, extra_callbacks=callbacks, register=False)


# --------------------------------------------------------------------------- placement groups


def _registry_cls():
    import ray

    @ray.remote(num_cpus=0)
    class TrialPlacementGroups:
        """Trial id -> (Train controller, its worker-group placement group), as recorded."""

        def __init__(self) -> None:
            self._entries: list[tuple[str, Any, Any, Any]] = []

        def add(self, trial_id: str, controller, pg, ray_cleaner=None) -> None:
            self._entries.append((trial_id, controller, pg, ray_cleaner))

        def entries(self) -> list[tuple[str, Any, Any, Any]]:
            return list(self._entries)

    return TrialPlacementGroups


class _PlacementGroupJanitor:
    """Removes the placement group of every Ray Train controller that died without
    removing it (a trial stopped by ASHA, or killed), so its CPUs/GPUs come back.

    Polls in a thread of the sweep driver: each recorded controller is pinged;
    a dead one (``RayActorError``) with a placement group not yet ``REMOVED``
    gets it removed.
    """

    def __init__(self, registry, interval_s: float = 1.0, log=None):
        self.registry = registry
        self.interval_s = interval_s
        self.released: list[tuple[str, str]] = []  # (trial id, placement group id)
        self._done: set[str] = set()
        self._pings: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweep-pg-janitor", daemon=True)
        self._log = log or _say

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception as exc:  # keep watching; a failed poll is retried
                self._log(f"[sweep] placement group check failed: {exc}")

    def check(self) -> int:
        """One pass; returns how many recorded placement groups are still held."""
        import ray
        from ray.util.placement_group import placement_group_table, remove_placement_group

        pending = 0
        for trial_id, controller, pg, ray_cleaner in ray.get(self.registry.entries.remote(), timeout=30):
            key = pg.id.hex()
            if key in self._done:
                continue
            if placement_group_table(pg).get("state") == "REMOVED":
                self._done.add(key)
                continue
            ref = self._pings.get(key)
            if ref is None:
                ref = self._pings[key] = controller.__ray_ready__.remote()
            ready, _ = ray.wait([ref], timeout=0.5)
            if not ready:  # alive and busy
                pending += 1
                continue
            self._pings.pop(key, None)
            try:
                ray.get(ref)
                pending += 1  # alive
                continue
            except ray.exceptions.RayActorError:
                pass
            if placement_group_table(pg).get("state") != "REMOVED":  # Ray's cleaner may have won the race
                try:
                    remove_placement_group(pg)
                    self.released.append((trial_id, key))
                    self._log(f"[sweep] released the placement group of stopped trial {trial_id} ({key[:12]})")
                except Exception as exc:
                    self._log(f"[sweep] could not remove placement group {key[:12]} of trial {trial_id}: {exc}")
            if ray_cleaner is not None:
                try:
                    ray.kill(ray_cleaner)
                except Exception:  # already exited
                    pass
            self._done.add(key)
        return pending

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop polling after a last pass that waits for every recorded controller to end."""
        self._stop.set()
        self._thread.join(timeout=10)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.check() == 0:
                return
            time.sleep(self.interval_s)
        self._log("[sweep] some Ray Train controllers were still alive when the sweep ended")


# --------------------------------------------------------------------------- progress


def _progress_callback_cls():
    from ray import tune as rtune

    class _SweepProgress(rtune.Callback):
        """One line per trial event (start, evaluation, end), on the driver's stdout."""

        def __init__(self, metric: str, keys: list[str]):
            self.metric, self.keys = metric, keys

        def log(self, msg: str) -> None:
            _say(msg)

        def _values(self, trial) -> str:
            return " ".join(f"{k}={_fmt(_plain(trial.config.get(k)))}" for k in self.keys)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.log(f"[sweep] trial {trial.trial_id} started: {self._values(trial)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.metric in result:
                self.log(f"[sweep] trial {trial.trial_id} step {result.get('step')}: "
                         f"{self.metric} {result[self.metric]:.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            self.log(f"[sweep] trial {trial.trial_id} ended at step {last.get('step')} "
                     f"({self.metric} {_fmt(last.get(self.metric))})")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.log(f"[sweep] trial {trial.trial_id} FAILED ({self._values(trial)}); the sweep goes on")

    return _SweepProgress


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    sweep_id: str
    sweep_dir: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    metric: str
    mode: str
    keys: list[str]
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    registered_model_name: str | None = None
    champion_version: str | None = None
    champion_uri: str | None = None
    csv_path: str | None = None
    heatmap_path: str | None = None
    released_placement_groups: list[tuple[str, str]] = field(default_factory=list)
    max_concurrent_trials: int = 1
    wall_s: float = 0.0


def _default_concurrency(base: TrainConfig, driver_cpus: float) -> int:
    """As many trials as worker groups fit, while every trial's data preparation
    (tokenizer actors) still leaves one CPU for Ray Data's read tasks."""
    import ray

    from pipelines.train import _use_gpu

    total = ray.cluster_resources()
    cpus = total.get("CPU", 1)
    train_need = base.scaling.num_workers * base.scaling.cpus_per_worker + driver_cpus
    prep_need = base.data.tokenize_concurrency * min(1.0, base.scaling.cpus_per_worker) + driver_cpus
    n = min(int(cpus // train_need), int(max(cpus - 1, 0) // prep_need)) if train_need > 0 else int(cpus)
    if _use_gpu(base) and base.scaling.gpus_per_worker > 0:
        n = min(n, int(total.get("GPU", 0) // (base.scaling.num_workers * base.scaling.gpus_per_worker)))
    return max(1, n)


def _search(sweep: SweepConfig, max_concurrent: int):
    """Tune param space and search algorithm."""
    space = sweep.space()
    param_space = {k: spec.tune_domain(sweep.algorithm) for k, spec in space.items()}
    if sweep.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return param_space, OptunaSearch(sampler=optuna.samplers.TPESampler(seed=sweep.seed))
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # A search algorithm passed in is not wrapped by TuneConfig.max_concurrent_trials
    # (only Searchers are): the generator limits itself.
    return param_space, BasicVariantGenerator(random_state=sweep.seed, max_concurrent=max_concurrent)


def _scheduler(sweep: SweepConfig, base: TrainConfig):
    if sweep.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    sc = sweep.scheduler
    if sc.time_attr == "step":
        grace = sc.grace_period or base.optimization.eval_every_n_steps or 1
        max_t = sc.max_t or base.optimization.max_steps or 1_000_000
    else:
        grace = sc.grace_period or 1
        max_t = sc.max_t or 1_000_000
    # stop_last_trials=False: a trial that reaches max_t is not stopped at its last report
    # (it finishes, exports its model and closes its MLflow run).
    return ASHAScheduler(time_attr=sc.time_attr, grace_period=grace, max_t=max(max_t, grace),
                         reduction_factor=sc.reduction_factor, stop_last_trials=False)


def run_sweep(sweep: SweepConfig, base: TrainConfig, *, verbose: int = 1, log=None) -> SweepResult:
    """Run the sweep end to end; see the module docstring."""
    log = log or _say
    import ray
    from mlflow.entities import Param
    from ray import tune as rtune

    from pipelines import tracking
    from pipelines.config import flatten
    from pipelines.train import init_ray

    check_sweep(sweep, base)
    t0 = time.time()
    init_ray()
    tracking_uri = tracking.resolve_tracking_uri(base.mlflow.tracking_uri)
    base = apply_overrides(base, {"mlflow.tracking_uri": tracking_uri})
    sweep_id = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    root = sweep.storage_path or os.path.join(base.checkpointing.storage_path, "sweeps")
    if "://" not in root:
        root = str(Path(root).resolve())
    sweep_dir = f"{root.rstrip('/')}/{sweep_id}"
    local_dir = Path(sweep_dir) if "://" not in sweep_dir else Path(tempfile_dir(sweep_id))
    local_dir.mkdir(parents=True, exist_ok=True)
    space = sweep.space()
    keys = list(space)
    metric, mode = sweep.metric, sweep.mode
    max_conc = sweep.max_concurrent_trials or _default_concurrency(base, sweep.driver_cpus)
    model_name = sweep.registered_model_name or base.mlflow.registered_model_name

    # -- the parent run
    client = tracking.MlflowClient(tracking_uri=tracking_uri)
    exp_id = tracking.experiment_id(client, base.mlflow.experiment, tracking_uri)
    parent = client.create_run(exp_id, run_name=sweep_id, tags={
        "mlflow.runName": sweep_id, SWEEP_TAG: "parent", "ift.sweep_id": sweep_id,
        "git_commit": tracking.git_commit(), "method": base.method.name,
    })
    parent_id = parent.info.run_id
    params = {
        "sweep.algorithm": sweep.algorithm, "sweep.metric": metric, "sweep.mode": mode,
        "sweep.num_samples": sweep.resolved_num_samples(), "sweep.max_concurrent_trials": max_conc,
        "sweep.scheduler": sweep.scheduler.type, "sweep.seed": sweep.seed, "sweep.storage": sweep_dir,
        **{f"sweep.scheduler.{k}": v for k, v in sweep.scheduler.model_dump().items() if k != "type"},
        **{f"space.{k}": spec.describe() for k, spec in space.items()},
        **{f"base.{k}": v for k, v in flatten(base).items() if k not in space},
    }
    items = [Param(k, ("" if v is None else str(v))[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(parent_id, params=items[i: i + 100])
    client.log_dict(parent_id, {"sweep": sweep.model_dump(mode="json"), "base": base.model_dump(mode="json")},
                    "sweep_config.json")
    log(f"[sweep] {sweep_id}: {sweep.algorithm} search over {', '.join(f'{k}~{s.describe()}' for k, s in space.items())}; "
        f"{sweep.scheduler.type} on {metric} ({mode}); up to {max_conc} trials at a time")
    log(f"[sweep] MLflow parent run {parent_id} in {tracking_uri}")

    registry = _registry_cls().remote()
    janitor = _PlacementGroupJanitor(registry, log=log)
    janitor.start()
    param_space, search_alg = _search(sweep, max_conc)
    trainable = rtune.with_resources(
        rtune.with_parameters(
            _trial, base=base.model_dump(mode="json"), sweep_id=sweep_id, parent_run_id=parent_id,
            trials_dir=f"{sweep_dir}/trials", metric=metric, registry=registry,
        ),
        {"CPU": sweep.driver_cpus, "memory": sweep.driver_memory_mb * 2**20},
    )
    tuner = rtune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=rtune.TuneConfig(
            metric=metric, mode=mode, search_alg=search_alg, scheduler=_scheduler(sweep, base),
            num_samples=sweep.resolved_num_samples(), reuse_actors=False,
            # Optuna (a Searcher) gets a ConcurrencyLimiter from this; the variant generator limits itself.
            max_concurrent_trials=max_conc if sweep.algorithm == "optuna" else None,
            trial_name_creator=lambda t: t.trial_id, trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=rtune.RunConfig(
            name="tune", storage_path=sweep_dir, verbose=verbose,
            failure_config=rtune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[_progress_callback_cls()(metric, keys)],
        ),
    )
    ok = False
    try:
        grid = tuner.fit()
        ok = True
    finally:
        janitor.stop()
        ray.kill(registry)
        if not ok:
            tracking.end_run(tracking_uri, parent_id, ok=False)

    rows = _collect_rows(grid, sweep_id, keys, metric)
    _reconcile_child_runs(client, exp_id, parent_id, sweep_id, rows, base)
    completed = [r for r in rows if r["status"] == COMPLETED and r.get(metric) is not None]
    best = None
    if completed:
        best = (min if mode == "min" else max)(completed, key=lambda r: r[metric])
        best["champion"] = True
    result = SweepResult(
        sweep_id=sweep_id, sweep_dir=sweep_dir, parent_run_id=parent_id, experiment_id=exp_id,
        tracking_uri=tracking_uri, metric=metric, mode=mode, keys=keys, rows=rows, best=best,
        registered_model_name=model_name, released_placement_groups=list(janitor.released),
        max_concurrent_trials=max_conc,
    )
    if best is not None and model_name and best.get("hf_model_path"):
        _register_champion(result, base, sweep, client)
    elif best is not None and not model_name:
        log("[sweep] no mlflow.registered_model_name / sweep.registered_model_name: the champion is not registered")

    result.csv_path = str(local_dir / "results.csv")
    write_results_csv(rows, keys, metric, result.csv_path)
    client.log_artifact(parent_id, result.csv_path)
    heat = plot_heatmap(rows, keys, metric, mode, local_dir / "heatmap.png", title=sweep_id)
    if heat is not None:
        result.heatmap_path = str(heat)
        client.log_artifact(parent_id, result.heatmap_path)
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    counts = {s: sum(r["status"] == s for r in rows) for s in (COMPLETED, STOPPED, ERROR)}
    metrics = [Metric(f"trials_{s.lower()}", n, now, 0) for s, n in counts.items()]
    metrics.append(Metric("placement_groups_released", len(janitor.released), now, 0))
    if best is not None:
        metrics.append(Metric(f"best_{metric}", float(best[metric]), now, 0))
        client.set_tag(parent_id, "best_trial_id", best["trial_id"])
        client.set_tag(parent_id, "best_run_id", best.get("mlflow_run_id") or "")
    client.log_batch(parent_id, metrics=metrics)
    result.wall_s = time.time() - t0
    client.log_metric(parent_id, "wall_s", result.wall_s)
    tracking.end_run(tracking_uri, parent_id, ok=True)
    return result


def tempfile_dir(name: str) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), "ift-sweeps", name)


def _collect_rows(grid, sweep_id: str, keys: list[str], metric: str) -> list[dict[str, Any]]:
    from pipelines.loop import HF_MODEL_DIR

    rows = []
    for res in grid:
        last = dict(res.metrics or {})
        trial_id = last.get("trial_id") or os.path.basename(str(res.path).rstrip("/"))
        df = res.metrics_dataframe
        history = []
        if df is not None and metric in getattr(df, "columns", []):
            history = [float(v) for v in df[metric].dropna().tolist()]
        ckpt = last.get("checkpoint_path")
        hf = os.path.join(ckpt, HF_MODEL_DIR) if ckpt else None
        if hf and not os.path.isdir(hf):
            hf = None
        if res.error is not None:
            status = ERROR
        else:
            status = COMPLETED if hf else STOPPED
        err = ""
        if res.error is not None:
            lines = [ln.strip() for ln in str(res.error).strip().splitlines() if ln.strip()]
            err = lines[-1][:500] if lines else type(res.error).__name__
        row = {
            "trial_id": trial_id,
            "run_name": trial_run_name(sweep_id, trial_id),
            "status": status,
            **{k: _plain(res.config.get(k)) for k in keys},
            "steps": last.get("step"),
            metric: float(last[metric]) if metric in last else None,
            f"best_{metric}": (min(history) if history else None),
            "evaluations": len(history),
            "checkpoint_path": ckpt,
            "hf_model_path": hf,
            "error": err,
            "champion": False,
        }
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def _reconcile_child_runs(client, exp_id: str, parent_id: str, sweep_id: str, rows: list[dict], base: TrainConfig):
    """Every trial gets a child run with its final status: FINISHED, KILLED (stopped early) or FAILED."""
    from mlflow.entities import Param

    from pipelines import tracking

    found = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                               max_results=10_000)
    by_name = {r.data.tags.get(tracking.RUN_NAME_TAG): r for r in found}
    for row in rows:
        run = by_name.get(row["run_name"])
        if run is None:  # crashed before `ift train` opened its run (e.g. an invalid sampled value)
            run = client.create_run(exp_id, run_name=row["run_name"], tags={
                "mlflow.runName": row["run_name"], "mlflow.parentRunId": parent_id,
                tracking.RUN_NAME_TAG: row["run_name"], "method": base.method.name,
            })
            client.log_batch(run.info.run_id, params=[Param(k, str(row.get(k))) for k in row
                                                      if "." in k])
        run_id = run.info.run_id
        row["mlflow_run_id"] = run_id
        client.set_tag(run_id, "ift.sweep_id", sweep_id)
        client.set_tag(run_id, "sweep.trial_id", row["trial_id"])
        client.set_tag(run_id, "sweep.status", row["status"].lower())
        status = {COMPLETED: "FINISHED", STOPPED: "KILLED", ERROR: "FAILED"}[row["status"]]
        if row["status"] == STOPPED:
            client.set_tag(run_id, "sweep.stopped_at_step", str(row["steps"]))
        if row["status"] == ERROR and row["error"]:
            client.set_tag(run_id, "sweep.error", row["error"][:5000])
        if row["status"] == STOPPED:
            _log_loss_curve(client, run_id, row["run_name"])
        current = client.get_run(run_id).info.status
        if current != status:
            client.set_terminated(run_id, status)


def _log_loss_curve(client, run_id: str, title: str) -> None:
    """A stopped trial was killed before `ift train` drew its loss curve; draw it here."""
    import tempfile

    from pipelines import tracking

    if "loss_curve.png" in [a.path for a in client.list_artifacts(run_id)]:
        return
    with tempfile.TemporaryDirectory() as tmp:
        png = tracking.plot_loss_curve(client, run_id, Path(tmp) / "loss_curve.png", f"{title} (stopped early)")
        if png is not None:
            client.log_artifact(run_id, str(png))


def _register_champion(result: SweepResult, base: TrainConfig, sweep: SweepConfig, client) -> None:
    from pipelines import tracking

    best = result.best
    assert best is not None
    run = client.get_run(best["mlflow_run_id"])
    cfg = apply_overrides(base, {"mlflow.registered_model_name": result.registered_model_name,
                                 **{k: best[k] for k in result.keys}})
    tags = {
        "method": cfg.method.name,
        "lam": str(cfg.method.lam), "decay": str(cfg.method.decay),
        result.metric: f"{best[result.metric]:.6f}",
        "sweep_id": result.sweep_id, "sweep_parent_run_id": result.parent_run_id,
        "trial_id": best["trial_id"], "run_name": best["run_name"],
        "data_fingerprint": run.data.tags.get("data_fingerprint.train", ""),
        "git_commit": tracking.git_commit(),
        **{f"space.{k}": str(best[k]) for k in result.keys},
    }
    uri, version = tracking.register_model(cfg, result.tracking_uri, best["mlflow_run_id"], best["hf_model_path"], tags)
    client.set_registered_model_alias(result.registered_model_name, sweep.alias, str(version))
    client.set_tag(best["mlflow_run_id"], "sweep.champion", "true")
    client.set_tag(result.parent_run_id, "champion_version", str(version))
    client.set_tag(result.parent_run_id, "champion_uri", f"models:/{result.registered_model_name}@{sweep.alias}")
    result.champion_version = str(version)
    result.champion_uri = f"models:/{result.registered_model_name}@{sweep.alias}"


# --------------------------------------------------------------------------- artifacts


def results_columns(keys: list[str], metric: str) -> list[str]:
    return ["trial_id", "status", *keys, "steps", metric, f"best_{metric}", "evaluations", "champion",
            "run_name", "mlflow_run_id", "error"]


def write_results_csv(rows: list[dict], keys: list[str], metric: str, path: str | os.PathLike) -> Path:
    cols = results_columns(keys, metric)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return Path(path)


def plot_heatmap(rows: list[dict], keys: list[str], metric: str, mode: str, out_path: str | os.PathLike,
                 title: str = "") -> Path | None:
    """The metric over method.lam x method.decay (else the first two numeric keys).

    A full grid is drawn as cells; sampled points as coloured markers.  Each
    point shows its value; trials stopped by ASHA are hatched/marked with the
    step they stopped at, failed trials are crossed out, the champion starred.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    numeric = [k for k in keys if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                      for r in rows if r.get(k) is not None)]
    if HEATMAP_X in numeric and HEATMAP_Y in numeric:
        x_key, y_key = HEATMAP_X, HEATMAP_Y
    elif len(numeric) >= 2:
        x_key, y_key = numeric[:2]
    else:
        return None
    pts = [r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
    if not pts:
        return None
    xs = sorted({float(r[x_key]) for r in pts})
    ys = sorted({float(r[y_key]) for r in pts})
    vals = [r.get(metric) for r in pts if r.get(metric) is not None]
    vmin, vmax = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 1e-6, vmax + 1e-6
    cmap = plt.get_cmap("viridis_r" if mode == "min" else "viridis")
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    grid_like = len(xs) * len(ys) == len({(float(r[x_key]), float(r[y_key])) for r in pts}) and len(xs) * len(ys) <= 400

    def label(r: dict) -> str:
        v = r.get(metric)
        txt = "-" if v is None else f"{v:.3f}"
        if r["status"] == STOPPED:
            txt += f"\nstopped@{r.get('steps')}"
        elif r["status"] == ERROR:
            txt = "failed"
        return txt + (" ★" if r.get("champion") else "")

    if grid_like:
        mat = np.full((len(ys), len(xs)), np.nan)
        cells: dict[tuple[int, int], dict] = {}
        for r in pts:
            i, j = ys.index(float(r[y_key])), xs.index(float(r[x_key]))
            cells[(i, j)] = r
            if r.get(metric) is not None:
                mat[i, j] = r[metric]
        im = ax.imshow(np.ma.masked_invalid(mat), origin="lower", cmap=cmap, norm=norm, aspect="auto")
        for (i, j), r in cells.items():
            if r["status"] == STOPPED:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", lw=0,
                                           edgecolor="0.6"))
            v = r.get(metric)
            red, green, blue, _ = cmap(norm(v)) if v is not None else (1, 1, 1, 1)
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(j, i, label(r), ha="center", va="center", fontsize=9, color="white" if dark else "black",
                    bbox={"facecolor": "none", "edgecolor": "none"})
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    else:
        im = None
        for r in pts:
            x, y, v = float(r[x_key]), float(r[y_key]), r.get(metric)
            marker = {COMPLETED: "o", STOPPED: "s", ERROR: "X"}[r["status"]]
            color = "red" if v is None or r["status"] == ERROR else cmap(norm(v))
            ax.scatter([x], [y], s=180 if r.get("champion") else 90, c=[color], marker=marker,
                       edgecolors="black", linewidths=1.5 if r.get("champion") else 0.5)
            ax.annotate(label(r), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        im = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
        ax.margins(0.15)
        from matplotlib.lines import Line2D

        ax.legend(handles=[Line2D([], [], marker=m, ls="", color="0.5", label=lab) for m, lab in
                           (("o", "completed"), ("s", "stopped early"), ("X", "failed"))], fontsize=8, loc="best")
    fig.colorbar(im, ax=ax, label=f"{metric} at the trial's last evaluation")
    ax.set_xlabel(x_key + (" (λ)" if x_key == HEATMAP_X else ""))
    ax.set_ylabel(y_key + (" (γ)" if y_key == HEATMAP_Y else ""))
    ax.set_title(f"{metric} by trial{' — ' + title if title else ''}", fontsize=10)
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- report and CLI


def summary(result: SweepResult) -> str:
    m = result.metric
    cols = ["trial", "status", *result.keys, "steps", m]
    order = sorted(result.rows, key=lambda r: (
        {COMPLETED: 0, STOPPED: 1, ERROR: 2}[r["status"]],
        (r[m] if result.mode == "min" else -r[m]) if r.get(m) is not None else math.inf,
    ))
    table = [[r["trial_id"] + (" *" if r.get("champion") else ""), r["status"],
              *[_fmt(r.get(k)) for k in result.keys], _fmt(r.get("steps")), _fmt(r.get(m))] for r in order]
    widths = [max(len(str(c)), *(len(str(row[i])) for row in table)) for i, c in enumerate(cols)]
    fmt_row = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths))  # noqa: E731
    lines = ["", f"Sweep '{result.sweep_id}' finished in {result.wall_s:.0f} s "
             f"({len(result.rows)} trials, up to {result.max_concurrent_trials} at a time).", "",
             "  " + fmt_row(cols), "  " + fmt_row(["-" * w for w in widths])]
    lines += ["  " + fmt_row(row) for row in table]
    lines.append("")
    for r in result.rows:
        if r["status"] == ERROR:
            lines.append(f"  trial {r['trial_id']} failed: {r['error']}")
    if result.best is not None:
        b = result.best
        lines.append(f"  best completed trial {b['trial_id']}: {m} {b[m]:.4f} with "
                     + ", ".join(f"{k}={_fmt(b[k])}" for k in result.keys)
                     + " (trials stopped early have no final model and are not candidates)")
    else:
        lines.append("  no trial completed: nothing registered")
    if result.champion_uri:
        lines.append(f"  champion          {result.champion_uri} (version {result.champion_version})")
    lines.append(f"  MLflow parent run {result.parent_run_id} in {result.tracking_uri}")
    if result.csv_path:
        lines.append(f"  results table     {result.csv_path} (and runs:/{result.parent_run_id}/results.csv)")
    if result.heatmap_path:
        lines.append(f"  heatmap           {result.heatmap_path} (and runs:/{result.parent_run_id}/heatmap.png)")
    lines.append(f"  trial checkpoints {result.sweep_dir}/trials")
    if result.released_placement_groups:
        lines.append(f"  released {len(result.released_placement_groups)} placement group(s) left by stopped trials")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ift sweep",
        description="Ray Tune search over the training config (default: IFT's method.lam and method.decay). "
                    "Each trial is an `ift train` run; ASHA stops trials with a poor validation metric early.",
        epilog="Examples:\n  ift sweep\n  ift sweep tune/configs/tiny-sweep.yaml sweep.algorithm=random --num-samples 6\n"
               "  ift sweep pipelines/configs/tiny.yaml optimization.max_steps=40 --space optimization.lr=loguniform(1e-4,1e-2)\n"
               "See docs/sweeps.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("items", nargs="*",
                        help="an optional sweep file or training config (path or packaged name), then key=value "
                             "overrides: training keys, or sweep.* keys for sweep settings")
    parser.add_argument("--algorithm", choices=["grid", "random", "optuna"], help="search algorithm")
    parser.add_argument("--num-samples", type=int, help="trials to sample (grid: repeats of the grid)")
    parser.add_argument("--max-concurrent", type=int, help="trials running at once")
    parser.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                        help="add/replace a search dimension: uniform(lo,hi[,n]), loguniform(lo,hi[,n]), "
                             "randint(lo,hi[,n]), choice(a,b,..), grid(a,b,..), or none to drop one")
    parser.add_argument("--quiet", action="store_true", help="no Tune status tables (trial lines only)")
    parser.add_argument("--list", action="store_true", help="list the packaged sweep files")
    args = parser.parse_args(argv)
    if args.list:
        for name in packaged_sweep_names():
            print(f"{name:24s} {packaged_sweep_path(name)}")
        return 0
    path = None
    items = list(args.items)
    if items and "=" not in items[0]:
        path = items.pop(0)
    try:
        sweep, base = load_sweep(path, items, algorithm=args.algorithm, num_samples=args.num_samples,
                                 max_concurrent=args.max_concurrent, space=args.space)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_sweep(sweep, base, verbose=0 if args.quiet else 1)
    print(summary(result))
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
