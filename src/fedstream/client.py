"""The client API: federate a plain training script with a handful of lines.

A job names the script in ``[client.script]``; every site runs it once for the whole job. The script keeps
its own loop and asks fedstream for work::

    import fedstream.client as fl

    fl.init()
    while fl.running():
        task = fl.receive()
        model.load_state_dict(task.weights)
        if task.is_validate:
            fl.send(num_samples=len(val_set), metrics={"accuracy": evaluate(model)})
            continue
        train(model)
        fl.send(model.state_dict(), num_samples=len(train_set), metrics={"train_loss": loss})

Each :func:`receive` is answered by one :func:`send`. The tracking writers (``MLflowWriter``,
``SummaryWriter``...) work in the script and in the threads it starts, as in a trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from fedstream.errors import FedstreamError
from fedstream.messages import TRAIN, VALIDATE, Task, Weights
from fedstream.site.context import SiteContext
from fedstream.site.executor import TaskOutput, checked_metrics, checked_samples, describe
from fedstream.site.script import Session, connect, current_session
from fedstream.wire import sendable

if TYPE_CHECKING:
    import torch

__all__ = ["ClientTask", "init", "receive", "running", "send", "site"]


class ClientTask:
    """A task from the server: ``kind`` (``train`` or ``validate``) in ``round`` (from 1) of ``num_rounds``,
    with the global model's weights and the workflow's settings (``config``)."""

    def __init__(self, task: Task) -> None:
        self._task = task
        self.kind = task.kind
        self.round = task.round
        self.num_rounds = task.num_rounds
        self.config: dict[str, Any] = dict(task.payload.config)

    @property
    def is_train(self) -> bool:
        return self.kind == TRAIN

    @property
    def is_validate(self) -> bool:
        return self.kind == VALIDATE

    @cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        """The global model as tensors: ``model.load_state_dict(task.weights)``."""
        return _tensors(self._task.payload.weights)

    @cached_property
    def extra(self) -> dict[str, dict[str, torch.Tensor]]:
        """Named groups of extra tensors a workflow sends (SCAFFOLD's control variate, for one)."""
        return {name: _tensors(group) for name, group in self._task.payload.extra.items()}

    @property
    def arrays(self) -> Weights:
        """The global model as numpy arrays (read-only; for scripts that do not use PyTorch)."""
        return self._task.payload.weights

    def global_step(self, local_step: int, steps_per_round: int) -> int:
        """A step that keeps growing across rounds: ``(round - 1) * steps_per_round + local_step``."""
        return (self.round - 1) * steps_per_round + local_step

    def __repr__(self) -> str:
        return f"ClientTask({self.kind!r}, round={self.round}, num_rounds={self.num_rounds})"


def init() -> None:
    """Connect this script to its site; raises when the script does not run inside a fedstream job."""
    _session()


def running() -> bool:
    """Wait for the next task; ``False`` once the job has ended (the script should then finish)."""
    return _session().running()


def receive() -> ClientTask:
    """The next task; answer it with :func:`send` before asking for another."""
    return ClientTask(_session().receive())


def send(
    weights: Mapping[str, Any] | None = None,
    *,
    num_samples: int,
    metrics: Mapping[str, float] | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Answer the task received last.

    Args:
        weights: after training, the trained model (``model.state_dict()``; tensors or numpy arrays).
        num_samples: the samples the task used (training samples weigh the site in the average).
        metrics: numbers to report (a validation task's accuracy, say).
        extra: named groups of extra arrays the workflow asks for (SCAFFOLD's control-variate update).
    """
    session = _session()
    where = "fl.send()"
    output = TaskOutput(
        checked_samples(num_samples, where),
        checked_metrics(dict(metrics or {}), where),
        _arrays(weights or {}, "weights", session),
        {name: _arrays(group, f"extra[{name!r}]", session) for name, group in (extra or {}).items()},
    )
    session.send(output)


def site() -> SiteContext:
    """Who this site is (``name``, ``index`` from 0 of ``num_sites``), its folder and its logger."""
    return _session().site


def _session() -> Session:
    session = current_session() or connect()
    if session is None:
        raise FedstreamError(
            "fedstream.client works in a training script that a fedstream job runs: name the script in the "
            "job's [client.script] and run the job (`fedstream simulate JOB_FOLDER -w WORKSPACE`)"
        )
    return session


def _tensors(arrays: Weights) -> dict[str, torch.Tensor]:
    import torch

    return {name: torch.from_numpy(np.require(array, requirements="W")) for name, array in arrays.items()}


def _arrays(values: Mapping[str, Any], what: str, session: Session) -> Weights:
    """``values`` as numpy arrays, copied where the site would otherwise read the script's live tensors."""
    if not isinstance(values, Mapping):
        raise TypeError(f"fl.send(): {what} must be a mapping of names to tensors, got {describe(values)}")
    arrays = {}
    for name, value in values.items():
        if not isinstance(name, str):
            raise TypeError(f"fl.send(): {what} names must be str, got {describe(name)}")
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        if not isinstance(value, np.ndarray):
            raise TypeError(f"fl.send(): {what}[{name!r}] must be a tensor or a numpy array, got {describe(value)}")
        if not sendable(value.dtype):
            raise TypeError(f"fl.send(): {what}[{name!r}] has dtype {value.dtype}, which cannot be sent")
        arrays[name] = value.copy() if session.shares_memory else value
    return arrays
