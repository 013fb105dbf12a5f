"""Frozen Lake validation of IFT (paper §5.3, Appendices B.2–B.3), rebuilt from the paper's text.

The authors released no code for this experiment; everything below follows the
paper's description and fills the gaps with choices that are stated here.

Environment
    Gymnasium ``FrozenLake-v1``, deterministic (``is_slippery=False``), on the map
    :data:`LAKE_MAP`.  Its safe cells form a ring around a block of holes, so there
    are exactly two simple safe routes from the start S to the gift G::

        S F F F F        optimal route  (6 steps):  R R R R D D   along the top
        F H F H F        sub-optimal    (10 steps): D D D D R R R R U U  along the
        F H H H G                         left and bottom edges
        F H F H F
        F F F F F        (1,2) and (3,2) are dead ends off the two routes.

Optimal policy
    Value iteration on ``env.unwrapped.P`` (γ = 0.9, reward 1 on reaching G).  The
    optimal state-action probabilities are uniform over the tied best actions,
    ``isclose(q, q.max())``.  On this map the only tie among non-terminal cells is
    (2,0), the cell opposite G on the ring (UP and DOWN are both 8 steps away).

Parameterized policy
    :class:`LakePolicy`, a two-layer fully connected network
    ``one-hot(cell) -> Linear(25, 32) -> tanh -> Linear(32, 4) -> logits``.  Its first
    layer acting on a one-hot vector is an embedding lookup, so mixing one-hot
    inputs is exactly mixing embeddings, as IFT does for tokens.

Start point (the "base model")
    For each seed, a network is initialised from ``torch.manual_seed(seed)`` and
    pre-trained (``pretrain_steps`` full-batch Adam steps, cross-entropy on every
    non-terminal cell) toward a *soft* sub-optimal policy: 0.7 on the action of
    :func:`suboptimal_probabilities` (the best policy that may not go RIGHT at the
    start, i.e. the one that takes the long route) and 0.1 on each other action.
    Why: it mirrors LM alignment, where the base model already has its own habit
    and the target differs from it; its greedy rollout is the rejected trajectory,
    so DPO's reference prefers the rejected route (as for on-policy preference
    pairs), and IFT's fused states (which use the model's own greedy moves) really
    differ from SFT's.  ``start="random"`` uses the seeded random init instead.

Optimal parameterized policy θ*
    Trained *from the same start parameters* θ0 with the same optimizer, learning
    rate and number of steps as the fine-tuning methods, by cross-entropy to the
    optimal state-action probabilities on all non-terminal cells (identical
    gradients to KL(π* ‖ π_θ)).  Sharing θ0 and the budget is what makes the
    parameter MSE of the paper's Figure 3 meaningful.

Methods (all from θ0, full-batch Adam, same lr and steps)
    * SFT  — :func:`ift.objectives.sft_loss_from_logps` on the optimal trajectory.
    * IFT  — :func:`ift.objectives.ift_loss_from_logps` (λ=0.2, decay 0.95) on the
      optimal trajectory with fused states, see below.
    * DPO  — :func:`ift.objectives.dpo_loss` (β=0.1), chosen = optimal trajectory,
      rejected = sub-optimal one, trajectory log-prob = *sum* of per-step action
      log-probs, reference = the frozen start policy θ0.
    * ORPO — :func:`ift.objectives.orpo_loss` (β=0.25), same pair, trajectory
      log-prob = *mean* per-step log-prob, NLL term = −mean log-prob of the chosen.

IFT on a trajectory, from eq. (17)
    Eq. (17) is ``ŝ_i = (1−λ)·s*_i + λ·π_θ(s*_{i−1})``.  In an LM, ``s*_i = [s*_{i−1},
    a*_{i−1}]`` and ``π_θ(s*_{i−1}) = [s*_{i−1}, â_{i−1}]`` with the greedy ``â``; both
    share the prefix, so only the newest position differs and the paper mixes the
    embeddings ``(1−λ)E(a*_{i−1}) + λE(â_{i−1})`` (Appendix B.3).  In Frozen Lake
    the state is the cell the last move led to: ``s*_i = T(s*_{i−1}, a*_{i−1})`` and
    the model's own next state is ``T(s*_{i−1}, argmax_a π_θ(a|s*_{i−1}))``.  With
    one-hot cells as the embedding, the fused input at step i ≥ 1 is::

        x_i = (1−λ)·onehot(s*_i) + λ·onehot(T(s*_{i−1}, argmax π_θ(s*_{i−1})))

    and ``x_0 = onehot(s*_0)``: the start state is the prompt ρ0, which IFT never
    mixes.  The greedy actions come from a no-grad pass on the true states (step 1
    of B.3).  The per-step log-probs of the target actions under ``x_i`` are then
    weighted by the discounted propagation of eq. (22) (Appendix B.1's decay) via
    ``ift_loss_from_logps(logps[None], mask[None], decay)``.  If the model's greedy
    move from s*_{i−1} already is a*_{i−1}, ``x_i`` is simply ``onehot(s*_i)``.

Metrics (per seed; aggregated as mean ± sample std over seeds)
    * ``mse``: mean over all network parameters of ``(θ − θ*)²`` (the paper's
      Figure 3 quantity).
    * ``kl``: mean over the non-terminal cells of ``KL(π*(·|s) ‖ π_θ(·|s))``.
    * ``success``: the greedy rollout from S reaches G (loops and holes fail).
    * ``optimal_path``: the greedy rollout is exactly the optimal trajectory.
    * ``grids_trained`` — "grids explored" in the paper's sense: the number of
      distinct cells that enter the loss's inputs with non-zero weight at any
      fine-tuning step (for IFT, the cells of the fused states; for DPO/ORPO both
      trajectories; for the optimal policy, every non-terminal cell).
    * ``grids_reached``: the number of distinct cells (holes and G included) that a
      *stochastic* rollout of the final policy from S enters with probability
      ≥ :data:`REACH_THRESHOLD` within :data:`REACH_HORIZON` steps (computed
      exactly, no sampling).
    * ``p_optimal_traj``: the probability the final policy assigns to the whole
      optimal trajectory.

No mlflow, ray or matplotlib here; ``experiments/frozenlake/run.py`` reports and logs.

One module on purpose: the lake, value iteration, the policy network and the four
fine-tuning methods are one experiment (§5.3), read top to bottom; split, each piece
would only make sense next to the others.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ift.objectives import dpo_loss, ift_loss_from_logps, orpo_loss, sft_loss_from_logps

__all__ = [
    "LAKE_MAP",
    "ACTIONS",
    "METHODS",
    "PAPER_ORDER",
    "REACH_THRESHOLD",
    "REACH_HORIZON",
    "Config",
    "Lake",
    "Trajectory",
    "LakePolicy",
    "make_lake",
    "value_iteration",
    "optimal_probabilities",
    "suboptimal_probabilities",
    "rollout",
    "fused_inputs",
    "init_policy",
    "start_policy",
    "train_optimal",
    "finetune",
    "evaluate",
    "run_seed",
    "run_experiment",
    "aggregate",
    "order_by",
]

LAKE_MAP: tuple[str, ...] = (
    "SFFFF",
    "FHFHF",
    "FHHHG",
    "FHFHF",
    "FFFFF",
)
LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
ACTIONS = ("LEFT", "DOWN", "RIGHT", "UP")
METHODS = ("sft", "ift", "dpo", "orpo")
# Figure 3 of the paper, lower MSE to the optimal parameters first.
PAPER_ORDER = ("dpo", "ift", "orpo", "sft")
REACH_THRESHOLD = 0.05
REACH_HORIZON = 100


@dataclass
class Config:
    """Every knob of the experiment; the defaults are the documented full run."""

    steps: int = 200  # fine-tuning steps, identical for every method and for θ*
    lr: float = 1e-2  # Adam, identical for every method and for θ*
    hidden: int = 32
    pretrain_steps: int = 300  # start point
    start: str = "suboptimal"  # or "random"
    start_smoothing: float = 0.4  # start target = (1−ε)·π_sub + ε·uniform
    lam: float = 0.2  # IFT λ (paper B.1)
    decay: float = 0.95  # IFT propagation decay (paper B.1)
    beta_dpo: float = 0.1
    beta_orpo: float = 0.25
    gamma: float = 0.9  # value-iteration discount
    methods: tuple[str, ...] = METHODS
    reach_threshold: float = REACH_THRESHOLD
    reach_horizon: int = REACH_HORIZON

    def __post_init__(self) -> None:
        if self.start not in ("suboptimal", "random"):
            raise ValueError(f"start must be 'suboptimal' or 'random', got {self.start!r}")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        if self.steps < 0 or self.pretrain_steps < 0:
            raise ValueError("steps and pretrain_steps must be non-negative")


# --------------------------------------------------------------------------- the lake


@dataclass(frozen=True)
class Lake:
    """The deterministic lake: its map and the transition table ``env.unwrapped.P``."""

    desc: tuple[str, ...]
    P: dict
    start: int
    goal: int
    holes: frozenset[int]

    @property
    def nrow(self) -> int:
        return len(self.desc)

    @property
    def ncol(self) -> int:
        return len(self.desc[0])

    @property
    def n_states(self) -> int:
        return self.nrow * self.ncol

    @property
    def n_actions(self) -> int:
        return len(ACTIONS)

    @property
    def terminal(self) -> np.ndarray:
        mask = np.zeros(self.n_states, dtype=bool)
        mask[list(self.holes)] = True
        mask[self.goal] = True
        return mask

    @property
    def nonterminal(self) -> np.ndarray:
        return np.flatnonzero(~self.terminal)

    def cell(self, s: int) -> tuple[int, int]:
        return divmod(int(s), self.ncol)

    def step(self, s: int, a: int) -> tuple[int, float, bool]:
        """Deterministic transition: (next state, reward, terminated)."""
        outcomes = self.P[int(s)][int(a)]
        if len(outcomes) != 1 or outcomes[0][0] != 1.0:
            raise ValueError("the lake must be deterministic (is_slippery=False)")
        _, nxt, reward, done = outcomes[0]
        return int(nxt), float(reward), bool(done)


def make_lake(desc: Sequence[str] = LAKE_MAP) -> Lake:
    """Build the Gymnasium FrozenLake (not slippery) and keep its transition table."""
    env = gym.make("FrozenLake-v1", desc=list(desc), is_slippery=False)
    try:
        P = {s: {a: list(v) for a, v in acts.items()} for s, acts in env.unwrapped.P.items()}
    finally:
        env.close()
    flat = "".join(desc)
    return Lake(
        desc=tuple(desc),
        P=P,
        start=flat.index("S"),
        goal=flat.index("G"),
        holes=frozenset(i for i, ch in enumerate(flat) if ch == "H"),
    )


def value_iteration(
    lake: Lake,
    gamma: float = 0.9,
    *,
    forbid: Sequence[tuple[int, int]] = (),
    tol: float = 1e-12,
    max_iter: int = 10_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Classical value iteration on ``lake.P``; returns ``(V, Q)`` in float64.

    ``Q(s,a) = Σ p·(r + γ·V(s')·[not terminated])``; terminal cells keep V = 0.
    ``forbid`` lists (state, action) pairs that are not allowed (their Q is −inf),
    used to derive the sub-optimal policy.
    """
    nS, nA = lake.n_states, lake.n_actions
    V = np.zeros(nS)
    terminal = lake.terminal
    banned = np.zeros((nS, nA), dtype=bool)
    for s, a in forbid:
        banned[s, a] = True
    Q = np.zeros((nS, nA))
    for _ in range(max_iter):
        Q = np.zeros((nS, nA))
        for s in range(nS):
            if terminal[s]:
                continue
            for a in range(nA):
                Q[s, a] = sum(p * (r + gamma * V[s2] * (not done)) for p, s2, r, done in lake.P[s][a])
        Q[banned] = -np.inf
        V_new = np.where(terminal, 0.0, Q.max(axis=1))
        if np.max(np.abs(V_new - V)) < tol:
            V = V_new
            break
        V = V_new
    return V, Q


def optimal_probabilities(Q: np.ndarray, terminal: np.ndarray | None = None) -> np.ndarray:
    """Uniform over the tied best actions: ``isclose(q, q.max())`` per state.

    Terminal rows (all-zero Q) come out uniform; they are never used as targets.
    """
    best = np.isclose(Q, Q.max(axis=1, keepdims=True))
    probs = best / best.sum(axis=1, keepdims=True)
    if terminal is not None:
        probs[terminal] = 1.0 / Q.shape[1]
    return probs


def suboptimal_probabilities(lake: Lake, gamma: float = 0.9) -> np.ndarray:
    """The best policy that may not move RIGHT from the start: it takes the long route."""
    _, Q = value_iteration(lake, gamma, forbid=[(lake.start, RIGHT)])
    return optimal_probabilities(Q, lake.terminal)


# --------------------------------------------------------------------------- trajectories


@dataclass(frozen=True)
class Trajectory:
    """``states[i]`` —``actions[i]``→ ``states[i+1]``; ``len(states) == len(actions) + 1``."""

    states: tuple[int, ...]
    actions: tuple[int, ...]
    success: bool

    @property
    def inputs(self) -> tuple[int, ...]:
        """The states an action is taken from (all but the last)."""
        return self.states[:-1]


def rollout(lake: Lake, probs: np.ndarray, max_steps: int | None = None) -> Trajectory:
    """Greedy rollout (``argmax`` per state, lowest index on ties) from the start.

    Stops at a hole, at G, on a revisited state (a deterministic loop never ends),
    or after ``max_steps`` (default: the number of cells).
    """
    max_steps = lake.n_states if max_steps is None else max_steps
    s, states, actions, seen = lake.start, [lake.start], [], {lake.start}
    for _ in range(max_steps):
        a = int(np.argmax(probs[s]))
        s2, reward, done = lake.step(s, a)
        states.append(s2)
        actions.append(a)
        if done:
            return Trajectory(tuple(states), tuple(actions), reward > 0)
        if s2 in seen:
            break
        seen.add(s2)
        s = s2
    return Trajectory(tuple(states), tuple(actions), False)


def _unique_greedy_path(lake: Lake, probs: np.ndarray) -> Trajectory:
    traj = rollout(lake, probs)
    for s in traj.inputs:
        if np.count_nonzero(probs[s] == probs[s].max()) != 1:
            raise ValueError(f"the policy ties at state {lake.cell(s)} on its own path")
    if not traj.success:
        raise ValueError("the policy does not reach the gift")
    return traj


# --------------------------------------------------------------------------- the policy


class LakePolicy(nn.Module):
    """Two fully connected layers: ``Linear(nS, hidden) → tanh → Linear(hidden, nA)``.

    Input: a (fused) one-hot cell vector of shape (..., nS); output: action logits.
    tanh rather than ReLU: no unit can die, so parameter distances are not driven
    by which units happened to switch off.
    """

    def __init__(self, n_states: int, n_actions: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_states, hidden)
        self.fc2 = nn.Linear(hidden, n_actions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))

    def probs(self, n_states: int | None = None) -> np.ndarray:
        """Action probabilities of every cell, float64 array (nS, nA)."""
        n = self.fc1.in_features if n_states is None else n_states
        with torch.no_grad():
            return self(torch.eye(n)).softmax(-1).double().numpy()


def _onehot(states: Sequence[int], n_states: int) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(list(states), dtype=torch.long), n_states).float()


def flat_params(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def param_mse(a: nn.Module, b: nn.Module) -> float:
    return float(((flat_params(a) - flat_params(b)) ** 2).mean())


def init_policy(lake: Lake, seed: int, hidden: int = 32) -> LakePolicy:
    """PyTorch's default init drawn from ``torch.manual_seed(seed)``, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LakePolicy(lake.n_states, lake.n_actions, hidden)


def _fit(
    net: nn.Module, states: Sequence[int], targets: np.ndarray, steps: int, lr: float, n_states: int
) -> list[float]:
    """Full-batch Adam on cross-entropy to (soft) target distributions."""
    x = _onehot(states, n_states)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = -(y * net(x).log_softmax(-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def start_policy(lake: Lake, seed: int, cfg: Config) -> LakePolicy:
    """The explicit, seeded start point θ0 shared by θ* and every method (see module doc)."""
    net = init_policy(lake, seed, cfg.hidden)
    if cfg.start == "suboptimal":
        sub = suboptimal_probabilities(lake, cfg.gamma)
        eps = cfg.start_smoothing
        target = (1 - eps) * sub + eps / lake.n_actions
        states = lake.nonterminal
        _fit(net, states, target[states], cfg.pretrain_steps, cfg.lr, lake.n_states)
    return net


def train_optimal(start: LakePolicy, lake: Lake, pi_star: np.ndarray, cfg: Config) -> tuple[LakePolicy, list[float]]:
    """θ*: from θ0, cross-entropy to π* on every non-terminal cell, same budget as the methods."""
    net = copy.deepcopy(start)
    states = lake.nonterminal
    losses = _fit(net, states, pi_star[states], cfg.steps, cfg.lr, lake.n_states)
    return net, losses


# --------------------------------------------------------------------------- IFT fused states


def fused_inputs(
    lake: Lake, traj: Trajectory, greedy_actions: Sequence[int], lam: float
) -> tuple[torch.Tensor, set[int]]:
    """IFT's fused state per step (module doc): ``x_0 = onehot(s*_0)`` and, for i ≥ 1,
    ``x_i = (1−λ)·onehot(s*_i) + λ·onehot(T(s*_{i−1}, greedy_actions[i−1]))``.

    ``greedy_actions[i]`` is the model's argmax at ``s*_i``.  Returns the (n, nS)
    inputs and the set of cells that enter them with non-zero weight.
    """
    n = len(traj.actions)
    x = _onehot(traj.inputs, lake.n_states)
    touched = set(traj.inputs)
    if lam == 0:
        return x, touched
    predicted = [lake.step(traj.states[i - 1], greedy_actions[i - 1])[0] for i in range(1, n)]
    if predicted:
        x = x.clone()
        x[1:] = (1 - lam) * x[1:] + lam * _onehot(predicted, lake.n_states)
        touched.update(predicted)
    return x, touched


# --------------------------------------------------------------------------- fine-tuning


def _action_logps(net: nn.Module, x: torch.Tensor, actions: Sequence[int]) -> torch.Tensor:
    a = torch.as_tensor(list(actions), dtype=torch.long)
    return net(x).log_softmax(-1).gather(-1, a[:, None]).squeeze(-1)


def finetune(
    method: str,
    start: LakePolicy,
    lake: Lake,
    chosen: Trajectory,
    rejected: Trajectory,
    cfg: Config,
) -> tuple[LakePolicy, dict]:
    """Fine-tune a copy of ``start`` with one method; returns the net and a history
    (``loss`` per step, ``touched``: the cells that entered the loss's inputs)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    net = copy.deepcopy(start)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    nS = lake.n_states
    x_c = _onehot(chosen.inputs, nS)
    x_r = _onehot(rejected.inputs, nS)
    mask_c = torch.ones(1, len(chosen.actions), dtype=torch.bool)
    touched: set[int] = set(chosen.inputs)
    if method in ("dpo", "orpo"):
        touched |= set(rejected.inputs)
    if method == "dpo":
        with torch.no_grad():
            ref_c = _action_logps(start, x_c, chosen.actions).sum()[None]
            ref_r = _action_logps(start, x_r, rejected.actions).sum()[None]
    losses: list[float] = []
    for _ in range(cfg.steps):
        if method == "sft":
            logps = _action_logps(net, x_c, chosen.actions)
            loss, _ = sft_loss_from_logps(logps[None], mask_c)
        elif method == "ift":
            with torch.no_grad():  # B.3 step 1: inference one step ahead on the true states
                greedy = net(x_c).argmax(-1).tolist()
            x_f, cells = fused_inputs(lake, chosen, greedy, cfg.lam)
            touched |= cells
            logps = _action_logps(net, x_f, chosen.actions)
            loss, _ = ift_loss_from_logps(logps[None], mask_c, cfg.decay)
        elif method == "dpo":
            pc = _action_logps(net, x_c, chosen.actions).sum()[None]
            pr = _action_logps(net, x_r, rejected.actions).sum()[None]
            loss, _ = dpo_loss(pc, pr, ref_c, ref_r, beta=cfg.beta_dpo)
        else:  # orpo
            mc = _action_logps(net, x_c, chosen.actions).mean()[None]
            mr = _action_logps(net, x_r, rejected.actions).mean()[None]
            loss, _ = orpo_loss(mc, mr, -mc, beta=cfg.beta_orpo)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, {"loss": losses, "touched": sorted(touched)}


# --------------------------------------------------------------------------- metrics


def kl_to_optimal(lake: Lake, pi_star: np.ndarray, probs: np.ndarray) -> float:
    """Mean over non-terminal cells of KL(π*(·|s) ‖ π(·|s)) (0·log 0 = 0)."""
    idx = lake.nonterminal
    p, q = pi_star[idx], np.clip(probs[idx], 1e-300, None)
    terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)
    return float(terms.sum(-1).mean())


def reach_probabilities(lake: Lake, probs: np.ndarray, horizon: int = REACH_HORIZON) -> np.ndarray:
    """P(a stochastic rollout of ``probs`` from S enters cell c within ``horizon`` steps), exact.

    One absorbing chain per target cell c, all propagated together: mass that
    enters c is counted once and removed; holes and G end an episode.
    """
    nS = lake.n_states
    M = np.zeros((nS, nS))
    for s in lake.nonterminal:
        for a in range(lake.n_actions):
            M[s, lake.step(s, a)[0]] += probs[s, a]
    mass = np.zeros((nS, nS))  # row c: distribution of episodes that have not yet entered c
    mass[:, lake.start] = 1.0
    hit = np.zeros(nS)
    hit[lake.start] = 1.0
    mass[lake.start] = 0.0
    diag = np.arange(nS)
    for _ in range(horizon):
        mass = mass @ M
        hit += mass[diag, diag]
        mass[diag, diag] = 0.0
    return hit


def evaluate(
    lake: Lake,
    net: LakePolicy,
    optimal_net: LakePolicy,
    pi_star: np.ndarray,
    optimal_traj: Trajectory,
    touched: Sequence[int],
    cfg: Config,
) -> dict:
    probs = net.probs(lake.n_states)
    traj = rollout(lake, probs)
    reach = reach_probabilities(lake, probs, cfg.reach_horizon)
    p_traj = float(np.prod([probs[s, a] for s, a in zip(optimal_traj.inputs, optimal_traj.actions, strict=True)]))
    return {
        "mse": param_mse(net, optimal_net),
        "kl": kl_to_optimal(lake, pi_star, probs),
        "success": float(traj.success),
        "optimal_path": float(traj.states == optimal_traj.states),
        "grids_trained": float(len(set(touched))),
        "grids_reached": float(np.count_nonzero(reach >= cfg.reach_threshold)),
        "p_optimal_traj": p_traj,
        "path": list(traj.states),
        "probs": probs.tolist(),
    }


# --------------------------------------------------------------------------- the experiment


def run_seed(
    seed: int,
    cfg: Config | None = None,
    lake: Lake | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> dict:
    """One seed: start θ0, optimal θ*, the four methods; returns per-policy metrics and losses."""
    cfg = cfg or Config()
    lake = lake or make_lake()
    _, Q = value_iteration(lake, cfg.gamma)
    pi_star = optimal_probabilities(Q, lake.terminal)
    optimal_traj = _unique_greedy_path(lake, pi_star)
    rejected = _unique_greedy_path(lake, suboptimal_probabilities(lake, cfg.gamma))

    start = start_policy(lake, seed, cfg)
    optimal_net, opt_losses = train_optimal(start, lake, pi_star, cfg)
    everything = [int(s) for s in lake.nonterminal]
    out = {
        "seed": seed,
        "policies": {
            "start": evaluate(lake, start, optimal_net, pi_star, optimal_traj, [], cfg),
            "optimal": evaluate(lake, optimal_net, optimal_net, pi_star, optimal_traj, everything, cfg),
        },
        "losses": {"optimal": opt_losses},
    }
    for method in cfg.methods:
        net, hist = finetune(method, start, lake, optimal_traj, rejected, cfg)
        out["policies"][method] = evaluate(lake, net, optimal_net, pi_star, optimal_traj, hist["touched"], cfg)
        out["losses"][method] = hist["loss"]
        if on_progress is not None:
            on_progress(method)
    return out


SCALARS = ("mse", "kl", "success", "optimal_path", "grids_trained", "grids_reached", "p_optimal_traj")


def aggregate(per_seed: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{policy: {metric: {"mean", "std"}}}``; std is the sample std (ddof=1; 0 for one seed)."""
    agg: dict[str, dict[str, dict[str, float]]] = {}
    for name in per_seed[0]["policies"]:
        agg[name] = {}
        for key in SCALARS:
            vals = np.array([r["policies"][name][key] for r in per_seed], dtype=np.float64)
            std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            agg[name][key] = {"mean": float(vals.mean()), "std": std}
    return agg


def order_by(agg: dict, metric: str = "mse", methods: Sequence[str] = METHODS) -> list[str]:
    """Methods sorted by the mean of ``metric``, lowest (closest to optimal) first."""
    return sorted((m for m in methods if m in agg), key=lambda m: agg[m][metric]["mean"])


def run_experiment(
    seeds: int = 5,
    steps: int = 200,
    *,
    cfg: Config | None = None,
    on_progress: Callable[[str], None] | None = None,
    **overrides,
) -> dict:
    """Run seeds 0..seeds−1 and aggregate.

    Returns ``{"config", "map", "optimal_trajectory", "rejected_trajectory",
    "pi_star", "per_seed", "aggregate", "order_mse", "order_kl", "paper_order"}``;
    ``on_progress(method)`` is called after each (seed, method) pair.
    """
    if seeds < 1:
        raise ValueError("seeds must be >= 1")
    cfg = cfg or Config(steps=steps, **overrides)
    lake = make_lake()
    _, Q = value_iteration(lake, cfg.gamma)
    pi_star = optimal_probabilities(Q, lake.terminal)
    optimal_traj = _unique_greedy_path(lake, pi_star)
    rejected = _unique_greedy_path(lake, suboptimal_probabilities(lake, cfg.gamma))
    per_seed = [run_seed(seed, cfg, lake, on_progress) for seed in range(seeds)]
    agg = aggregate(per_seed)
    config = asdict(cfg)
    config["methods"] = list(cfg.methods)
    config["seeds"] = seeds
    return {
        "config": config,
        "map": list(lake.desc),
        "optimal_trajectory": {"states": list(optimal_traj.states), "actions": list(optimal_traj.actions)},
        "rejected_trajectory": {"states": list(rejected.states), "actions": list(rejected.actions)},
        "pi_star": pi_star.tolist(),
        "per_seed": per_seed,
        "aggregate": agg,
        "order_mse": order_by(agg, "mse", cfg.methods),
        "order_kl": order_by(agg, "kl", cfg.methods),
        "paper_order": list(PAPER_ORDER),
    }
