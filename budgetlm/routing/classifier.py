"""A trainable router: logistic regression over local embeddings of the query.

RouteLLM (arXiv 2406.18665) trains routers on preference labels between a strong and a weak model;
here the label of a training query is "the strong model is needed" (the cheap model fails where the
strong one succeeds: :func:`strong_needed_labels`), which a user derives from their own pair's eval
records.  Features are local, no external API:

- ``features="model"``: the mean last-layer hidden state of the query from a backend that
  implements :class:`~budgetlm.backends.base.EmbeddingBackend` (the transformers backend does);
- ``features="hashing"``: signed feature hashing of word uni- and bigrams (no model at all; works
  with any backend, also the fallback when the backend cannot embed).

Features are standardised with the training mean/std; the classifier is L2-regularised logistic
regression fitted by Newton's method (IRLS) in numpy, so fitting is deterministic and exact.
``w = σ(θᵀx)``.  :meth:`state` / :meth:`load_state` save and restore it as JSON.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from budgetlm.backends.base import Backend, EmbeddingBackend
from budgetlm.errors import ConfigError, invalid
from budgetlm.io import JsonObject, JsonValue
from budgetlm.meter import Meter
from budgetlm.routing.base import ROUTERS, RouteQuery, Router

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def hashing_features(texts: Sequence[str], dim: int = 512) -> np.ndarray:
    """Signed hashed counts of word unigrams and bigrams, L2-normalised: ``[len(texts), dim]``."""
    out = np.zeros((len(texts), dim))
    for r, t in enumerate(texts):
        words = _WORD.findall(t.lower())
        for g in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
            h = int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
            out[r, h % dim] += 1.0 if (h >> 63) & 1 else -1.0
        n = np.linalg.norm(out[r])
        if n > 0:
            out[r] /= n
    return out


def strong_needed_labels(weak_correct: Sequence[bool], strong_correct: Sequence[bool]) -> list[int]:
    """1 where the weak model fails and the strong one succeeds, else 0 (the router's training label)."""
    if len(weak_correct) != len(strong_correct):
        raise invalid("strong_correct", f"one value per weak result ({len(weak_correct)})", f"{len(strong_correct)} values")
    return [int((not w) and bool(s)) for w, s in zip(weak_correct, strong_correct, strict=True)]


class EmbeddingClassifierRouter(Router):
    """``w = σ(θᵀ x)`` with ``x`` the query's (standardised) embedding; train with :meth:`fit`."""

    name = "embedding"

    def __init__(self, features: Literal["model", "hashing"] = "model", l2: float = 1.0, dim: int = 512,
                 max_iter: int = 50) -> None:
        if features not in ("model", "hashing"):
            raise invalid("features", "'model' (the backend's hidden states) or 'hashing' (no model)", features)
        if not l2 > 0:
            raise invalid("l2", "a positive regularisation strength", l2)
        if not isinstance(dim, int) or dim < 8:
            raise invalid("dim", "an integer >= 8 (hashing feature size)", dim)
        self.features = features
        self.l2 = float(l2)
        self.dim = dim
        self.max_iter = max_iter
        self.theta: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    # ------------------------------------------------------------------------------ features
    def featurize(self, queries: Sequence[RouteQuery], backend: Backend | None = None) -> np.ndarray:
        """The raw feature matrix of ``queries`` (cached on each query's ``features``)."""
        todo = [q for q in queries if q.features is None]
        if todo:
            texts = [q.text for q in todo]
            if self.features == "model":
                if backend is None or not isinstance(backend, EmbeddingBackend):
                    kind = "no backend" if backend is None else type(backend).__name__
                    raise ConfigError(f"router 'embedding' with features='model' needs a backend with `embed` "
                                      f"(the transformers backend 'hf:...'), got {kind}; or pass features='hashing'")
                x = np.asarray(backend.embed(texts), dtype=float)
            else:
                x = hashing_features(texts, self.dim)
            for q, row in zip(todo, x, strict=True):
                q.features = row
        return np.stack([np.asarray(q.features, dtype=float) for q in queries])

    # ------------------------------------------------------------------------------ training
    def fit(self, queries: Sequence[RouteQuery], labels: Sequence[int | bool], backend: Backend | None = None) -> EmbeddingClassifierRouter:
        """Fit on ``queries`` with 0/1 ``labels`` (1 = strong model needed); returns ``self``."""
        y = np.asarray([float(v) for v in labels])
        if len(queries) != len(y) or len(y) == 0:
            raise invalid("labels", f"one 0/1 label per query ({len(queries)} queries)", f"{len(y)} labels")
        if not set(np.unique(y)) <= {0.0, 1.0}:
            raise invalid("labels", "0/1 values (1 = strong model needed)", sorted(set(y.tolist())))
        x = self.featurize(queries, backend)
        self.mean = x.mean(0)
        self.std = x.std(0) + 1e-6
        z = np.hstack([np.ones((len(y), 1)), (x - self.mean) / self.std])
        theta = np.zeros(z.shape[1])
        reg = self.l2 * np.eye(z.shape[1])
        reg[0, 0] = 0.0  # the intercept is not shrunk
        for _ in range(self.max_iter):
            p = 1.0 / (1.0 + np.exp(-(z @ theta)))
            grad = z.T @ (p - y) + reg @ theta
            hess = (z * (p * (1 - p))[:, None]).T @ z + reg + 1e-9 * np.eye(z.shape[1])
            step = np.linalg.solve(hess, grad)
            theta -= step
            if np.abs(step).max() < 1e-8:
                break
        self.theta = theta
        return self

    def score(self, queries: Sequence[RouteQuery], backend: Backend | None = None,
              meters: Sequence[Meter | None] | None = None) -> list[float]:
        if self.theta is None or self.mean is None or self.std is None:
            raise ConfigError("router 'embedding' is not trained; call `fit(queries, labels)` or load a calibration "
                              "written by `budgetlm route calibrate`")
        x = self.featurize(queries, backend)
        if x.shape[1] != self.mean.shape[0]:
            raise ConfigError(f"router 'embedding' was trained on {self.mean.shape[0]}-dim features, got {x.shape[1]}; "
                              "use the same backend (or hashing `dim`) as in training")
        z = np.hstack([np.ones((len(x), 1)), (x - self.mean) / self.std])
        probs: list[float] = (1.0 / (1.0 + np.exp(-(z @ self.theta)))).tolist()
        return probs

    # ------------------------------------------------------------------------------ persistence
    def state(self) -> JsonObject:
        if self.theta is None or self.mean is None or self.std is None:
            return {}
        return {"theta": self.theta.tolist(), "mean": self.mean.tolist(), "std": self.std.tolist()}

    def load_state(self, state: Mapping[str, JsonValue]) -> None:
        try:
            self.theta, self.mean, self.std = (np.asarray(state[k], dtype=float) for k in ("theta", "mean", "std"))
        except KeyError as exc:
            raise ConfigError(f"router 'embedding' state needs theta, mean and std, missing {exc}") from None


ROUTERS.register(EmbeddingClassifierRouter.name, EmbeddingClassifierRouter)
