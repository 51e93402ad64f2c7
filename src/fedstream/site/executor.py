"""What runs a site's tasks: the seam between the site runtime and the code that trains.

The site runtime hands every task to its site's :class:`Executor` and sends back what it returns. A
PyTorch :class:`~fedstream.pt.trainer.Trainer` is run by :class:`fedstream.pt.executor.TrainerExecutor`;
other kinds of site code (a plain training script) are other executors. The site runtime itself imports
no machine-learning library.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from fedstream.messages import Task, Weights
from fedstream.site.context import SiteContext


@dataclass(frozen=True)
class TaskOutput:
    """What an executor made of a task: the samples it used, metrics, and weights and extra arrays to return."""

    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    weights: Weights = field(default_factory=dict, repr=False)
    extra: dict[str, Weights] = field(default_factory=dict, repr=False)


class Executor(ABC):
    """Runs one site's tasks; one instance per site, set up before its first task."""

    @abstractmethod
    def setup(self, site: SiteContext) -> None:
        """Prepare for the site's first task (build the model, load data). Raising fails that task."""

    @abstractmethod
    def execute(self, task: Task) -> TaskOutput:
        """Run ``task``; raise to fail it (the exception's message reaches the server)."""

    def release(self) -> None:  # noqa: B027 - optional hook
        """Called after every task: free what is not needed until the next one."""


class Unusable(Executor):
    """The executor of a site that cannot run the job (its own settings are wrong): every task fails with
    ``error``, so the server learns why."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def setup(self, site: SiteContext) -> None:
        raise self.error

    def execute(self, task: Task) -> TaskOutput:
        raise self.error
