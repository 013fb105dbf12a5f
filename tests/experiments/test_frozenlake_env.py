"""Frozen Lake validation (paper §5.3), the library part ``experiments.frozenlake.env``: environment, optimal policy,
IFT fused states and what the methods must do.  The ``ift frozenlake`` command is tested in
tests/experiments/test_frozenlake_run.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from experiments.frozenlake import env as fl
from experiments.frozenlake.env import DOWN, LEFT, RIGHT, UP

OPTIMAL_STATES = (0, 1, 2, 3, 4, 9, 14)  # (0,0)→(0,4) along the top, then down to G=(2,4)
OPTIMAL_ACTIONS = (RIGHT, RIGHT, RIGHT, RIGHT, DOWN, DOWN)
LONG_STATES = (0, 5, 10, 15, 20, 21, 22, 23, 24, 19, 14)  # left edge, bottom edge, up to G
LONG_ACTIONS = (DOWN,) * 4 + (RIGHT,) * 4 + (UP,) * 2


@pytest.fixture(scope="module")
def lake() -> fl.Lake:
    return fl.make_lake()


@pytest.fixture(scope="module")
def small_run() -> dict:
    """Few seeds and steps: what the methods must do already holds here."""
    return fl.run_experiment(seeds=2, steps=60)


# ----------------------------------------------------------------------------- environment and optimal policy


def test_lake_is_the_designed_deterministic_map(lake: fl.Lake) -> None:
    assert lake.desc == fl.LAKE_MAP
    assert (lake.start, lake.goal) == (0, 14)
    assert lake.holes == {6, 8, 11, 12, 13, 16, 18}
    assert len(lake.nonterminal) == 17
    assert lake.step(0, RIGHT) == (1, 0.0, False)
    assert lake.step(0, LEFT) == (0, 0.0, False)  # wall: stay
    assert lake.step(1, DOWN) == (6, 0.0, True)  # hole
    assert lake.step(9, DOWN) == (14, 1.0, True)  # gift


def test_value_iteration_gives_the_short_route(lake: fl.Lake) -> None:
    V, Q = fl.value_iteration(lake, gamma=0.9)
    pi = fl.optimal_probabilities(Q, lake.terminal)
    traj = fl.rollout(lake, pi)
    assert traj.success
    assert traj.states == OPTIMAL_STATES and traj.actions == OPTIMAL_ACTIONS
    assert V[lake.start] == pytest.approx(0.9**5)  # reward 1 on the 6th move
    assert np.all(V[lake.terminal] == 0)


def test_suboptimal_policy_takes_the_long_route(lake: fl.Lake) -> None:
    traj = fl.rollout(lake, fl.suboptimal_probabilities(lake))
    assert traj.success
    assert traj.states == LONG_STATES and traj.actions == LONG_ACTIONS


def test_tie_rule_isclose_to_max() -> None:
    Q = np.array([[0.5, 0.5, 0.1, 0.5 - 1e-12], [0.0, 0.2, 0.9, 0.3]])
    probs = fl.optimal_probabilities(Q)
    np.testing.assert_allclose(probs[0], [1 / 3, 1 / 3, 0, 1 / 3])
    np.testing.assert_allclose(probs[1], [0, 0, 1, 0])


def test_only_the_cell_opposite_the_gift_ties(lake: fl.Lake) -> None:
    _, Q = fl.value_iteration(lake, gamma=0.9)
    pi = fl.optimal_probabilities(Q, lake.terminal)
    np.testing.assert_allclose(pi.sum(1), 1)
    tied = [int(s) for s in lake.nonterminal if np.count_nonzero(pi[s]) > 1]
    assert tied == [10]  # (2,0): UP and DOWN are both 8 moves from G
    np.testing.assert_allclose(pi[10], [0, 0.5, 0, 0.5])
    assert pi[5].argmax() == UP  # (1,0) turns back to the short route


# ----------------------------------------------------------------------------- IFT fused states


def test_fused_states_hand_worked(lake: fl.Lake) -> None:
    traj = fl.Trajectory(OPTIMAL_STATES, OPTIMAL_ACTIONS, True)
    greedy = [DOWN, RIGHT, UP, RIGHT, DOWN, DOWN]  # the model's argmax at s*_0..s*_5
    x, touched = fl.fused_inputs(lake, traj, greedy, lam=0.2)
    e = torch.eye(lake.n_states)
    expected = torch.stack(
        [
            e[0],  # the start (prompt) is never mixed
            0.8 * e[1] + 0.2 * e[5],  # from (0,0) the model goes DOWN to (1,0)
            e[2],  # from (0,1) the model goes RIGHT, as the target does
            0.8 * e[3] + 0.2 * e[2],  # from (0,2) the model goes UP into the wall: stays at (0,2)
            e[4],
            e[9],
        ]
    )
    torch.testing.assert_close(x, expected)
    assert touched == {0, 1, 2, 3, 4, 9, 5}
    x0, touched0 = fl.fused_inputs(lake, traj, greedy, lam=0.0)
    torch.testing.assert_close(x0, e[list(OPTIMAL_STATES[:-1])])
    assert touched0 == set(OPTIMAL_STATES[:-1])


def test_ift_with_no_fusion_and_no_propagation_is_sft(lake: fl.Lake) -> None:
    cfg = fl.Config(steps=15, pretrain_steps=20, lam=0.0, decay=0.0)
    start = fl.start_policy(lake, seed=0, cfg=cfg)
    chosen = fl.Trajectory(OPTIMAL_STATES, OPTIMAL_ACTIONS, True)
    rejected = fl.Trajectory(LONG_STATES, LONG_ACTIONS, True)
    ift_net, ift_hist = fl.finetune("ift", start, lake, chosen, rejected, cfg)
    sft_net, sft_hist = fl.finetune("sft", start, lake, chosen, rejected, cfg)
    torch.testing.assert_close(fl.flat_params(ift_net), fl.flat_params(sft_net))
    assert ift_hist["loss"] == pytest.approx(sft_hist["loss"])


# ----------------------------------------------------------------------------- what the methods must do


def test_start_point_is_seeded_and_not_optimal(lake: fl.Lake, small_run: dict) -> None:
    cfg = fl.Config(pretrain_steps=30)
    a, b = fl.start_policy(lake, 3, cfg), fl.start_policy(lake, 3, cfg)
    torch.testing.assert_close(fl.flat_params(a), fl.flat_params(b))
    assert not torch.equal(fl.flat_params(a), fl.flat_params(fl.start_policy(lake, 4, cfg)))
    for rec in small_run["per_seed"]:
        start = rec["policies"]["start"]
        assert start["success"] == 1.0 and start["optimal_path"] == 0.0  # it takes the long route
        assert tuple(start["path"]) == LONG_STATES


def test_ift_ends_closer_to_optimal_parameters_than_its_start(small_run: dict) -> None:
    for rec in small_run["per_seed"]:
        pol = rec["policies"]
        assert pol["ift"]["mse"] < pol["start"]["mse"]
        assert pol["ift"]["p_optimal_traj"] > 0.5 > pol["start"]["p_optimal_traj"]


def test_greedy_rollouts_reach_the_gift_where_they_should(small_run: dict) -> None:
    for rec in small_run["per_seed"]:
        pol = rec["policies"]
        for name in ("optimal", "sft", "ift", "orpo"):
            assert pol[name]["success"] == 1.0, name
            assert tuple(pol[name]["path"]) == OPTIMAL_STATES, name
        # DPO must at least prefer the chosen first move over the rejected one.
        probs = np.array(pol["dpo"]["probs"])
        assert probs[0, RIGHT] > probs[0, DOWN]


def test_grids_explored_in_training(small_run: dict) -> None:
    agg = small_run["aggregate"]
    assert agg["sft"]["grids_trained"]["mean"] == 6  # the optimal route's cells only
    assert agg["dpo"]["grids_trained"]["mean"] == 15 == agg["orpo"]["grids_trained"]["mean"]  # both routes
    assert agg["ift"]["grids_trained"]["mean"] > 6  # + cells of the model's own moves
    assert agg["optimal"]["grids_trained"]["mean"] == 17


def test_library_module_imports_no_mlflow_or_matplotlib() -> None:
    code = (
        "import sys, experiments.frozenlake.env; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mlflow', 'ray', 'deepspeed', 'matplotlib')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
