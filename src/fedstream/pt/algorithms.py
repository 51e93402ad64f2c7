"""The site's side of FedProx and SCAFFOLD, for a Trainer or a training script.

The server's workflow says what a round asks for: :class:`~fedstream.workflows.FedProx` puts ``fedprox_mu``
in the task's ``config``, :class:`~fedstream.workflows.Scaffold` sends its control variate as the extra
group ``scaffold_c`` and expects ``scaffold_delta_c`` back. A training loop that supports both, with
``scaffold = ScaffoldState()`` made once per site (it keeps the site's control variate across rounds)::

    prox = ProximalTerm(model, task.config.get(FEDPROX_MU, 0.0))        # after loading the global weights
    correction = scaffold.start(model, task.extra) if SCAFFOLD_C in task.extra else None
    for x, y in batches:
        loss = criterion(model(x), y) + prox()
        loss.backward()
        if correction: correction.apply()
        optimizer.step()
    extra = {SCAFFOLD_DELTA_C: correction.finish(steps, lr)} if correction else {}

Under FedAvg neither does anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedstream.messages import Weights
from fedstream.workflows.fedprox import FEDPROX_MU
from fedstream.workflows.scaffold import SCAFFOLD_C, SCAFFOLD_DELTA_C

__all__ = ["FEDPROX_MU", "SCAFFOLD_C", "SCAFFOLD_DELTA_C", "ProximalTerm", "ScaffoldRound", "ScaffoldState"]


class ProximalTerm:
    """FedProx's proximal term ``mu / 2 * ||w - w_global||^2`` over the model's parameters.

    Create it right after the global weights are loaded (it keeps a copy of them); add its value to the
    loss of every batch. With ``mu = 0`` it is a constant zero and costs nothing.
    """

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        if not (isinstance(mu, (int, float)) and mu >= 0):
            raise ValueError(f"the FedProx mu must be a number, 0 or more, got {mu!r}")
        self.mu = float(mu)
        self._params = [p for p in model.parameters() if p.requires_grad] if self.mu else []
        self._anchors = [p.detach().clone() for p in self._params]

    def __call__(self) -> torch.Tensor | float:
        if not self.mu:
            return 0.0
        total = sum(((p - a) ** 2).sum() for p, a in zip(self._params, self._anchors, strict=True))
        return self.mu / 2 * total


class ScaffoldState:
    """A site's SCAFFOLD state (Karimireddy et al., 2020, option II): its control variate ``c_i``, kept
    across rounds (zero at first), and the correction of each round's gradients."""

    def __init__(self) -> None:
        self.control: dict[str, torch.Tensor] = {}

    def start(self, model: torch.nn.Module, extra: Mapping[str, Mapping[str, Any]]) -> ScaffoldRound:
        """Begin a round whose task carried the server's control variate (``extra[SCAFFOLD_C]``); ``model``
        holds the global weights."""
        server = {name: torch.as_tensor(np.asarray(value)) for name, value in extra[SCAFFOLD_C].items()}
        for name, value in server.items():
            self.control.setdefault(name, torch.zeros_like(value))
        return ScaffoldRound(self, model, server)


class ScaffoldRound:
    """One round of SCAFFOLD on a site: :meth:`apply` after every backward pass, :meth:`finish` at the end."""

    def __init__(self, state: ScaffoldState, model: torch.nn.Module, server: dict[str, torch.Tensor]) -> None:
        self._state = state
        self._server = server
        named = dict(model.named_parameters())
        missing = sorted(named.keys() - server.keys())
        if missing:
            raise ValueError(f"the server's SCAFFOLD control variate lacks the model's parameters {missing[:5]}")
        self._params = named
        self._start = {name: p.detach().clone() for name, p in named.items()}
        self._correction = {name: server[name] - state.control[name] for name in named}

    def apply(self) -> None:
        """Correct the gradients just computed: ``g + c - c_i``."""
        for name, param in self._params.items():
            if param.grad is not None:
                param.grad.add_(self._correction[name])

    def finish(self, steps: int, lr: float) -> Weights:
        """After ``steps`` local steps of (mean) size ``lr`` per unit of gradient: update ``c_i`` and return its
        change (every name of the server's control variate; zero for the model's buffers) to send back as
        ``SCAFFOLD_DELTA_C``. With SGD momentum ``m``, a step moves about ``lr / (1 - m)``: pass that."""
        if steps < 1 or not lr > 0:
            raise ValueError(f"SCAFFOLD needs at least one local step at a positive rate, got {steps} at {lr}")
        delta = {}
        for name, server in self._server.items():
            if name in self._params:
                trained = self._params[name].detach()
                change = (self._start[name] - trained) / (steps * lr) - server
            else:
                change = torch.zeros_like(server)
            self._state.control[name] = self._state.control[name] + change
            delta[name] = change.numpy()
        return delta
