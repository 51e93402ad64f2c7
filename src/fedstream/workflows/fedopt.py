"""FedOpt (Reddi et al., 2021, "Adaptive Federated Optimization"): FedAvg whose server applies an optimiser
to the round's average update ``delta = average - global`` instead of taking the average as it is.

With ``x`` the global model, ``m`` and ``v`` the optimiser's state (float64, one model each):

- ``sgd``: ``m = momentum * m + delta``; ``x = x + server_lr * m`` (computed as
  ``(1 - server_lr) * x + server_lr * average + server_lr * momentum * m_before``, which is the average itself,
  bit for bit, at ``server_lr = 1`` without momentum);
- ``adagrad``, ``adam``, ``yogi``: ``m = beta1 * m + (1 - beta1) * delta`` and
  ``v = v + delta^2`` (adagrad), ``beta2 * v + (1 - beta2) * delta^2`` (adam),
  ``v - (1 - beta2) * delta^2 * sign(v - delta^2)`` (yogi); ``x = x + server_lr * m / (sqrt(v) + tau)``,
  with ``v`` starting at ``tau^2`` and no bias correction, as in the paper.

Only floating-point arrays are optimised; integer ones (counters) take the average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedstream.errors import ConfigError
from fedstream.messages import Weights
from fedstream.workflows.fedavg import FedAvg, RoundUpdate

Optimizer = Literal["sgd", "adagrad", "adam", "yogi"]


class FedOpt(FedAvg):
    """FedAvg with a server optimiser.

    Args:
        optimizer: ``sgd`` (with ``momentum``), ``adagrad``, ``adam`` or ``yogi``. The defaults (``sgd``,
            ``server_lr`` 1, ``momentum`` 0.9) are FedAvg with server momentum (FedAvgM, Hsu et al., 2019).
        server_lr: the server's learning rate.
        momentum: SGD's momentum (``sgd`` only; 0 with ``server_lr`` 1 is FedAvg).
        beta1: the first-moment decay (``adagrad``, ``adam``, ``yogi``).
        beta2: the second-moment decay (``adam``, ``yogi``).
        tau: the adaptivity floor added to ``sqrt(v)`` (``adagrad``, ``adam``, ``yogi``).
        **kwargs: every argument of :class:`~fedstream.workflows.FedAvg`.
    """

    def __init__(
        self,
        *,
        optimizer: Optimizer = "sgd",
        server_lr: float = 1.0,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        if optimizer not in ("sgd", "adagrad", "adam", "yogi"):
            raise ConfigError(f"must be sgd, adagrad, adam or yogi, got {optimizer!r}", key="optimizer")
        for name, value in (("server_lr", server_lr), ("tau", tau)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"must be a positive number, got {value}", key=name)
        for name, value in (("momentum", momentum), ("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise ConfigError(f"must be in [0, 1), got {value}", key=name)
        super().__init__(**kwargs)
        self.optimizer = optimizer
        self.server_lr = server_lr
        self.momentum = momentum
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m: Weights = {}
        self.v: Weights = {}

    def round_update(self, weights: Weights, sites: Sequence[str], scratch: Path) -> RoundUpdate:
        return _OptimizedUpdate(self, weights, scratch)

    def saved_arrays(self) -> dict[str, Weights]:
        return {"m": self.m, "v": self.v}

    def restore(self, arrays: dict[str, Weights]) -> None:
        self.m, self.v = dict(arrays.get("m", {})), dict(arrays.get("v", {}))

    def step(self, name: str, x: np.ndarray, average: np.ndarray) -> np.ndarray:
        """The optimiser's step for one array: the new value of ``x`` (float64) given the ``average``."""
        lr = self.server_lr
        delta = average - x
        if self.optimizer == "sgd":
            previous = self.m.get(name)
            new = (1 - lr) * x + lr * average
            if self.momentum:
                if previous is not None:
                    new += lr * self.momentum * previous
                self.m[name] = delta if previous is None else self.momentum * previous + delta
            return new
        m = self.m.get(name, np.zeros_like(x))
        v = self.v.get(name, np.full_like(x, self.tau**2))
        m = self.beta1 * m + (1 - self.beta1) * delta
        square = delta * delta
        if self.optimizer == "adagrad":
            v = v + square
        elif self.optimizer == "adam":
            v = self.beta2 * v + (1 - self.beta2) * square
        else:
            v = v - (1 - self.beta2) * square * np.sign(v - square)
        self.m[name], self.v[name] = m, v
        stepped: np.ndarray = x + lr * m / (np.sqrt(v) + self.tau)
        return stepped


class _OptimizedUpdate(RoundUpdate):
    def __init__(self, workflow: FedOpt, weights: Weights, scratch: Path) -> None:
        super().__init__(scratch)
        self._workflow = workflow
        self.weights = weights  # the step starts from the round's model

    def result(self) -> Weights:
        updated = {}
        for name, mean in self.average.means().items():
            dtype = self.weights[name].dtype  # every result was checked against the global model's dtypes
            if np.issubdtype(dtype, np.floating):
                value = self._workflow.step(name, self.weights[name].astype(np.float64), mean)
            else:
                value = np.rint(mean)
            updated[name] = value.astype(dtype)
        return updated
