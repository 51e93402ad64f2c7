"""FedProx (Li et al., 2020): FedAvg whose sites add a proximal term ``mu / 2 * ||w - w_global||^2`` to
their loss, which keeps local models near the global one on heterogeneous data.

The server's side is FedAvg plus ``fedprox_mu`` in every train task's config; the site applies it with
:class:`fedstream.pt.algorithms.ProximalTerm` (the hello-pt trainers do).
"""

from __future__ import annotations

import math
from typing import Any

from fedstream.errors import ConfigError
from fedstream.messages import Payload, Weights
from fedstream.workflows.fedavg import FedAvg

FEDPROX_MU = "fedprox_mu"
"""The train task's config key of the proximal weight (``fedstream.pt.algorithms.FEDPROX_MU``)."""


class FedProx(FedAvg):
    """FedAvg with a proximal term on the sites.

    Args:
        mu: the proximal weight; 0 is FedAvg.
        **kwargs: every argument of :class:`~fedstream.workflows.FedAvg`.
    """

    def __init__(self, *, mu: float = 0.01, **kwargs: Any) -> None:
        if not (math.isfinite(mu) and mu >= 0):
            raise ConfigError(f"must be a finite number, 0 or more, got {mu}", key="mu")
        super().__init__(**kwargs)
        self.mu = mu

    def train_payload(self, weights: Weights) -> Payload:
        return Payload(weights, config={FEDPROX_MU: self.mu})
