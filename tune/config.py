"""Sweep settings: the schema of a sweep file, the packaged sweeps, and turning a file plus
command-line items into checked ``(SweepConfig, TrainConfig)`` before Ray starts.

A sweep file is YAML with ``train_config`` (a packaged training config or a path),
``overrides`` (training keys for every trial) and a ``sweep:`` section
(:class:`SweepConfig`).  A plain training config is swept with the default sweep
settings; no file at all is the packaged ``tune/configs/tiny-sweep.yaml``.  See
``docs/sweeps.md``.
"""

from __future__ import annotations

import difflib
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.config import ConfigError, TrainConfig
from pipelines.config_loading import (
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


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a sweep file fails before Ray starts."""

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
    def _check(self) -> ParamSpec:
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
        if self.type in ("choice", "grid"):
            return list(self.values or [])
        n = self.grid_points
        if self.type == "randint":
            return sorted({int(round(v)) for v in np.linspace(self.low, self.high, n)})
        pts = np.geomspace(self.low, self.high, n) if self.type == "loguniform" else np.linspace(self.low, self.high, n)
        return [round(float(v), 10) for v in pts]

    def tune_domain(self, algorithm: str) -> Any:
        """This dimension as a Ray Tune search domain (or grid) for ``algorithm``."""
        from ray import tune as rtune  # Ray Tune loads when a sweep runs, not when a sweep file is read

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
        """A short text form for logs and MLflow params, e.g. ``uniform(0, 0.5)``."""
        if self.type in ("choice", "grid"):
            return f"{self.type}({', '.join(map(str, self.values or []))})"
        return f"{self.type}({self.low:g}, {self.high:g})"


# The default search space: IFT's lambda of eq. (17) and the propagation decay.
DEFAULT_SPACE: dict[str, ParamSpec] = {
    "method.lam": ParamSpec(type="uniform", low=0.0, high=0.5),
    "method.decay": ParamSpec(type="uniform", low=0.8, high=1.0),
}


class SchedulerConfig(_Strict):
    """The trial scheduler: ASHA early stopping, or none."""

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
    """The ``sweep:`` section of a sweep file."""

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
        """The search space: the default lam/decay space with this sweep's dimensions merged in."""
        merged: dict[str, ParamSpec | None] = {**DEFAULT_SPACE, **self.search_space}
        return {k: v for k, v in merged.items() if v is not None}

    def resolved_num_samples(self) -> int:
        """``num_samples``, or its default: 1 (one pass over the grid) for grid, else 8."""
        return self.num_samples or (1 if self.algorithm == "grid" else 8)


class SweepFile(_Strict):
    """A whole sweep file: the training config, its overrides and the ``sweep:`` section."""

    train_config: str | None = Field(None, description="Training config: packaged name or path (relative to the file).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Training keys set for every trial.")
    sweep: SweepConfig = Field(default_factory=SweepConfig)


# --------------------------------------------------------------------------- loading


def packaged_sweep_path(name: str) -> Path:
    """The path of packaged sweep ``name`` (under ``tune/configs``), whether or not it exists."""
    return Path(str(resources.files(PACKAGED_SWEEPS).joinpath(f"{name}.yaml")))


def packaged_sweep_names() -> list[str]:
    """The packaged sweep files, by name."""
    return sorted(p.name[:-5] for p in resources.files(PACKAGED_SWEEPS).iterdir() if p.name.endswith(".yaml"))


def _find_yaml(path: str) -> Path:
    """A path, else a packaged sweep, else a packaged training config of that name."""
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


def plain(value: Any) -> Any:
    """numpy scalars (from Tune's samplers) -> Python values the config validates."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value
