"""The client trainer API for PyTorch: subclass :class:`Trainer` and write the training and validation loops.

The runtime gives the trainer its model and site, calls :meth:`Trainer.setup` once, and for every task loads
the server's global weights into ``self.model`` before calling :meth:`Trainer.train` or
:meth:`Trainer.validate`. After ``train`` it sends ``self.model``'s weights back with the sample count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedstream.messages import Weights
from fedstream.site.context import SiteContext


@dataclass(frozen=True)
class TaskInfo:
    """The task being run: ``train`` or ``validate``, in ``round`` (from 1) of ``num_rounds``.

    ``config`` holds the workflow's settings for the task (FedProx's ``fedprox_mu``) and ``extra`` its named
    groups of extra arrays (SCAFFOLD's ``scaffold_c``); :mod:`fedstream.pt.algorithms` reads both.
    """

    name: str
    round: int
    num_rounds: int
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Weights] = field(default_factory=dict, repr=False)

    def global_step(self, local_step: int, steps_per_round: int) -> int:
        """A step that keeps growing across rounds: ``(round - 1) * steps_per_round + local_step``.

        Use it for metrics logged during training so that successive rounds never overlap.
        """
        return (self.round - 1) * steps_per_round + local_step


@dataclass(frozen=True)
class TrainOutput:
    """What training reports besides the weights: how many samples it trained on, any metrics, and named
    groups of extra arrays the workflow asks for (SCAFFOLD's ``scaffold_delta_c``)."""

    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Weights] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ValidationOutput:
    """Metrics of the global model on the site's validation data, and how many samples they cover."""

    num_samples: int
    metrics: dict[str, float]


class Trainer(ABC):
    """A site's trainer. Constructor arguments come from ``client.trainer.args``; keep the constructor
    cheap (it also runs on the server to check the config) and load data in :meth:`setup`."""

    model: torch.nn.Module
    site: SiteContext

    def attach(self, site: SiteContext, model: torch.nn.Module) -> None:
        """Called by the runtime before :meth:`setup`."""
        self.site = site
        self.model = model

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load data and build what training needs; called once, before the site's first task."""

    @abstractmethod
    def train(self, task: TaskInfo) -> TrainOutput:
        """Train ``self.model`` (which holds the global weights) on local data."""

    @abstractmethod
    def validate(self, task: TaskInfo) -> ValidationOutput:
        """Evaluate ``self.model`` (which holds the global weights) on local validation data."""

    def get_weights(self) -> Weights:
        """The model's weights as numpy arrays (no copy for CPU tensors)."""
        return {name: tensor.detach().cpu().numpy() for name, tensor in self.model.state_dict().items()}

    def release(self) -> None:
        """Called after every task: drop the gradients, which would otherwise stay allocated until the next
        round (a model's worth of memory per site)."""
        self.model.zero_grad(set_to_none=True)

    def set_weights(self, weights: Weights) -> None:
        """Load the server's weights into the model."""
        state = {name: torch.from_numpy(np.require(array, requirements="W")) for name, array in weights.items()}
        self.model.load_state_dict(state)
