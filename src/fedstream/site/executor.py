"""What runs a site's tasks: the seam between the site runtime and the code that trains.

The site runtime hands every task to its site's :class:`Executor` and sends back what it returns. A
PyTorch :class:`~fedstream.pt.trainer.Trainer` is run by :class:`fedstream.pt.executor.TrainerExecutor`;
other kinds of site code (a plain training script) are other executors. The site runtime itself imports
no machine-learning library.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Called once when the site has finished (after its last task, or without any): end what runs."""


class Unusable(Executor):
    """The executor of a site that cannot run the job (its own settings are wrong): every task fails with
    ``error``, so the server learns why."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def setup(self, site: SiteContext) -> None:
        raise self.error

    def execute(self, task: Task) -> TaskOutput:
        raise self.error


MAX_SAMPLES = 10**12
"""More samples than any site has: a larger count is a bug that would swamp the weighted average."""


def describe(value: Any) -> str:
    """A value's type and the start of its repr, for error messages."""
    return f"{type(value).__name__} {value!r:.80}"


def checked_samples(value: Any, where: str) -> int:
    """``value`` as a sample count (an int from 1 to :data:`MAX_SAMPLES`); ``where`` names the code that gave it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: num_samples must be an int, got {describe(value)}")
    if not 1 <= int(value) <= MAX_SAMPLES:
        raise ValueError(
            f"{where}: num_samples must be from 1 to {MAX_SAMPLES:.0e}, got {value} "
            "(the count of samples the task used; it weights the site in the average)"
        )
    return int(value)


def checked_metrics(metrics: Any, where: str) -> dict[str, float]:
    """``metrics`` as a dict of names to floats; ``where`` names the code that gave it."""
    if not isinstance(metrics, dict):
        raise TypeError(f"{where}: metrics must be a dict of names to numbers, got {describe(metrics)}")
    checked = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: metric names must be str, got {describe(key)}")
        if isinstance(value, (str, bytes, bool)) or value is None:
            raise TypeError(f"{where}: metric {key!r} must be a number, got {describe(value)}")
        try:
            checked[key] = float(value)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"{where}: metric {key!r} must be a number, got {describe(value)}") from None
    return checked


def checked_extra(extra: Any, where: str) -> dict[str, Weights]:
    """``extra`` as named groups of named numpy arrays; ``where`` names the code that gave it."""
    if not isinstance(extra, dict):
        raise TypeError(f"{where}: extra must be a dict of group names to arrays, got {describe(extra)}")
    for group, arrays in extra.items():
        if not isinstance(group, str) or not isinstance(arrays, dict):
            raise TypeError(
                f"{where}: extra[{group!r}] must be a dict of names to numpy arrays, got {describe(arrays)}"
            )
        for name, array in arrays.items():
            if not isinstance(name, str) or not isinstance(array, np.ndarray):
                raise TypeError(f"{where}: extra[{group!r}][{name!r}] must be a numpy array, got {describe(array)}")
    return extra
