"""LinUCB: a contextual bandit that learns online which model to call (GreenServ, arXiv 2601.17551).

Per arm ``a`` (a model, cheapest first) it keeps ``A_a = λI + Σ x xᵀ`` and ``b_a = Σ r x`` over the
contexts ``x`` it was routed and the rewards ``r`` it earned; ``θ_a = A_a⁻¹ b_a`` is the ridge
regression of reward on context, and the arm chosen is ``argmax_a θ_aᵀx + α·sqrt(xᵀA_a⁻¹x)``
(ALGORITHMS.md §8).  The reward mixes success and cost:
``r = clip((1 − λ_c)·acc + λ_c·(1 − cost_norm), 0, 1)`` (:func:`bandit_reward`; ``λ_c`` is
``cost_weight``).

Context: a bias term, signed hashed word features of the query (``dim``; no model needed) and,
for agent steps, the step context (budget left ρ and the step's position), so the bandit can learn
to spend where it pays.  For two arms :meth:`LinUCB.score` is the UCB difference (large − small):
threshold 0 routes to the arm with the higher bound, and a calibrated threshold trades share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from budgetlm.backends.base import Backend
from budgetlm.errors import ConfigError, invalid
from budgetlm.io import JsonObject, JsonValue
from budgetlm.meter import Meter
from budgetlm.routing.base import ROUTERS, RouteQuery, Router
from budgetlm.routing.classifier import hashing_features


def bandit_reward(success: float, cost_norm: float, cost_weight: float) -> float:
    """``clip((1 − cost_weight)·success + cost_weight·(1 − cost_norm), 0, 1)``."""
    if not 0.0 <= cost_weight <= 1.0:
        raise invalid("cost_weight", "in [0, 1] (0: success only, 1: cost only)", cost_weight)
    return float(np.clip((1 - cost_weight) * success + cost_weight * (1 - cost_norm), 0.0, 1.0))


class LinUCB(Router):
    """Contextual bandit over ``n_arms`` models; learns from :meth:`update` rewards."""

    name = "linucb"
    default_threshold = 0.0

    def __init__(self, n_arms: int = 2, alpha: float = 1.0, ridge: float = 1.0, dim: int = 32,
                 cost_weight: float = 0.3, use_context: bool = True) -> None:
        if not isinstance(n_arms, int) or n_arms < 2:
            raise invalid("n_arms", "an integer >= 2", n_arms)
        if alpha < 0:
            raise invalid("alpha", "a non-negative exploration weight", alpha)
        if not ridge > 0:
            raise invalid("ridge", "a positive ridge λ (A starts at λI)", ridge)
        if not isinstance(dim, int) or dim < 1:
            raise invalid("dim", "a positive integer (hashed word features)", dim)
        bandit_reward(0.0, 0.0, cost_weight)  # validates cost_weight
        self.n_arms = n_arms
        self.alpha = float(alpha)
        self.ridge = float(ridge)
        self.dim = dim
        self.cost_weight = float(cost_weight)
        self.use_context = use_context
        d = self.n_features
        self.A = np.stack([self.ridge * np.eye(d) for _ in range(n_arms)])
        """``A_a`` per arm, ``[n_arms, d, d]``."""
        self.b = np.zeros((n_arms, d))
        """``b_a`` per arm, ``[n_arms, d]``."""
        self.pulls: np.ndarray = np.zeros(n_arms, dtype=int)
        """Updates per arm."""

    @property
    def n_features(self) -> int:
        """Context size: bias + hashed words (+ ρ and step position)."""
        return 1 + self.dim + (2 if self.use_context else 0)

    def context(self, q: RouteQuery) -> np.ndarray:
        """The context vector ``x`` of a query (cached on ``q.features``)."""
        if q.features is None or len(q.features) != self.n_features:
            parts = [np.ones(1), hashing_features([q.text], self.dim)[0]]
            if self.use_context:
                c = q.context
                pos = float(c.get("step", 0)) / max(float(c.get("max_steps", 1)), 1.0)
                parts.append(np.array([float(c.get("rho", 1.0)), pos]))
            q.features = np.concatenate(parts)
        return np.asarray(q.features, dtype=float)

    def theta(self) -> np.ndarray:
        """``θ_a = A_a⁻¹ b_a`` per arm, ``[n_arms, d]``."""
        return np.stack([np.linalg.solve(self.A[a], self.b[a]) for a in range(self.n_arms)])

    def ucb(self, x: np.ndarray) -> np.ndarray:
        """Upper confidence bound of every arm for context ``x``."""
        out = np.empty(self.n_arms)
        for a in range(self.n_arms):
            a_inv_x = np.linalg.solve(self.A[a], x)
            out[a] = float(np.linalg.solve(self.A[a], self.b[a]) @ x) + self.alpha * float(np.sqrt(max(float(x @ a_inv_x), 0.0)))
        return out

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        out = []
        for q in queries:
            u = self.ucb(self.context(q))
            out.append(float(u[-1] - u[:-1].max()))
        return out

    def choose(self, queries: Sequence[RouteQuery], thresholds: Sequence[float], backend: Backend | None = None,
               meters: Sequence[Meter | None] | None = None) -> tuple[list[int], list[float]]:
        if self.n_arms == 2:
            return super().choose(queries, thresholds, backend, meters)
        arms, ws = [], []
        for q in queries:
            u = self.ucb(self.context(q))
            arms.append(int(np.argmax(u)))
            ws.append(float(u.max()))
        return arms, ws

    def update(self, query: RouteQuery, arm: int, reward: float) -> None:
        if not 0 <= arm < self.n_arms:
            raise invalid("arm", f"an arm index in [0, {self.n_arms - 1}]", arm)
        x = self.context(query)
        self.A[arm] += np.outer(x, x)
        self.b[arm] += float(reward) * x
        self.pulls[arm] += 1

    def reward(self, success: float, cost_norm: float) -> float:
        """This bandit's reward for an outcome (see :func:`bandit_reward`)."""
        return bandit_reward(success, cost_norm, self.cost_weight)

    def state(self) -> JsonObject:
        return {"A": self.A.tolist(), "b": self.b.tolist(), "pulls": self.pulls.tolist()}

    def load_state(self, state: Mapping[str, JsonValue]) -> None:
        A, b = np.asarray(state.get("A"), dtype=float), np.asarray(state.get("b"), dtype=float)
        if A.shape != self.A.shape or b.shape != self.b.shape:
            raise ConfigError(f"router 'linucb' state has shapes {A.shape}/{b.shape}, expected {self.A.shape}/"
                              f"{self.b.shape}; use the same n_arms, dim and use_context as when it was saved")
        self.A, self.b = A, b
        self.pulls = np.asarray(state.get("pulls", [0] * self.n_arms), dtype=int)


ROUTERS.register(LinUCB.name, LinUCB)
