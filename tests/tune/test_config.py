"""Sweep files, search-space items and the checks made before Ray starts (no Ray)."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError
from tune.config import ParamSpec, load_sweep, parse_space_item


def test_space_items_parse():
    assert parse_space_item("method.lam=uniform(0, 0.5)") == (
        "method.lam",
        {"type": "uniform", "low": 0.0, "high": 0.5},
    )
    assert parse_space_item("optimization.lr=loguniform(1e-4,1e-2,3)")[1]["grid_points"] == 3
    assert parse_space_item("method.name=choice(ift, sft)")[1] == {"type": "choice", "values": ["ift", "sft"]}
    assert parse_space_item("method.decay=none") == ("method.decay", None)
    with pytest.raises(ConfigError, match="not one of"):
        parse_space_item("method.lam=normal(0,1)")


def test_grid_values():
    assert ParamSpec(type="uniform", low=0, high=0.5, grid_points=3).grid_values() == [0.0, 0.25, 0.5]
    assert ParamSpec(type="loguniform", low=1e-4, high=1e-2, grid_points=3).grid_values() == [1e-4, 1e-3, 1e-2]
    assert ParamSpec(type="randint", low=1, high=4, grid_points=2).grid_values() == [1, 4]


def test_default_space_is_lam_and_decay_and_keys_are_checked():
    sweep, base = load_sweep("tiny")  # a training config: default sweep settings
    assert sweep.algorithm == "random" and sweep.resolved_num_samples() == 8
    space = sweep.space()
    assert (space["method.lam"].low, space["method.lam"].high) == (0.0, 0.5)
    assert (space["method.decay"].low, space["method.decay"].high) == (0.8, 1.0)
    sweep, _ = load_sweep(
        None, ["sweep.num_samples=3"], algorithm="optuna", space=["optimization.lr=loguniform(1e-4,1e-2)"]
    )
    assert sweep.algorithm == "optuna" and sweep.num_samples == 3 and "optimization.lr" in sweep.space()
    with pytest.raises(ConfigError, match="did you mean 'method.lam'"):
        load_sweep(None, space=["method.lamb=uniform(0,1)"])
    with pytest.raises(ConfigError, match="eval_every_n_steps"):
        load_sweep(None, ["optimization.eval_every_n_steps=0"])
    with pytest.raises(ConfigError, match="sweep.algoritm"):
        load_sweep(None, ["sweep.algoritm=grid"])
    with pytest.raises(ConfigError, match="optuna cannot enumerate"):
        load_sweep(None, algorithm="optuna", space=["method.name=grid(ift,sft)"])
