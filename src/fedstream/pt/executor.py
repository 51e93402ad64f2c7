"""Run a job's PyTorch :class:`~fedstream.pt.trainer.Trainer` as a site's executor.

It builds the job's model and trainer on the site, loads the server's weights into the model before every
task, calls ``train`` or ``validate``, checks what they return (a clear error naming the trainer when it is
not what the API promises), and sends the model's weights back after training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from fedstream.config import Job
from fedstream.events import EventBus
from fedstream.messages import TRAIN, VALIDATE, EventBatch, Task
from fedstream.pt.trainer import TaskInfo, Trainer, TrainOutput, ValidationOutput
from fedstream.site.context import SiteContext
from fedstream.site.executor import Executor, TaskOutput, checked_extra, checked_metrics, checked_samples, describe
from fedstream.site.script import ScriptExecutor
from fedstream.site.site import Site


def preload() -> None:
    """Import ahead what a site's first task would import: ``torch._dynamo`` is loaded by an optimizer's first
    use (about 1 s and 70 MB). Site processes call it before they have work."""
    import torch._dynamo  # noqa: F401


class TrainerExecutor(Executor):
    """Builds ``job``'s model and trainer for a site and runs its tasks."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self._trainer: Trainer | None = None

    def setup(self, site: SiteContext) -> None:
        model = self._job.component("model").build(nn.Module)
        trainer = self._job.component("client.trainer").build(Trainer)
        trainer.attach(site, model)
        trainer.setup()
        self._trainer = trainer

    def execute(self, task: Task) -> TaskOutput:
        trainer = self._trainer
        assert trainer is not None, "setup() runs before the first task"
        trainer.set_weights(task.payload.weights)
        info = TaskInfo(task.kind, task.round, task.num_rounds, task.payload.config, task.payload.extra)
        if task.kind not in (TRAIN, VALIDATE):
            raise ValueError(f"a Trainer runs 'train' and 'validate' tasks, not {task.kind!r}")
        where = f"{type(trainer).__qualname__}.{task.kind}()"
        expected = TrainOutput if task.kind == TRAIN else ValidationOutput
        output = trainer.train(info) if task.kind == TRAIN else trainer.validate(info)
        if not isinstance(output, expected):
            raise TypeError(f"{where} must return a fedstream.{expected.__name__}, got {describe(output)}")
        return TaskOutput(
            checked_samples(output.num_samples, where),
            checked_metrics(output.metrics, where),
            trainer.get_weights() if task.kind == TRAIN else {},
            checked_extra(output.extra, where) if isinstance(output, TrainOutput) else {},
        )

    def release(self) -> None:
        if self._trainer is not None:
            self._trainer.release()


def executor_for(job: Job) -> Executor:
    """The executor of ``job``'s site code: its training script, or its Trainer class."""
    script = job.config.client.script
    if script is not None:
        return ScriptExecutor(job.dir, script, job.config.client.forward)
    return TrainerExecutor(job)


def job_sites(
    job: Job,
    job_id: str,
    indices: dict[str, int],
    num_sites: int,
    workspace: Path,
    send_events: Callable[[EventBatch], None],
    executor: Callable[[], Executor] | None = None,
    *,
    journal_events: bool = False,
) -> Callable[[str], Site]:
    """Makes the :class:`~fedstream.site.site.Site` of ``job`` for a site name (its index in ``indices``, of
    ``num_sites``):
    its context, its executor (``executor()``; by default :func:`executor_for` the job), and its events sent
    through ``send_events`` (and kept on disk until delivered, with ``journal_events``). Every site host makes
    its sites with it."""

    def make(name: str) -> Site:
        context = SiteContext(
            name=name,
            index=indices[name],
            num_sites=num_sites,
            job_name=job.name,
            job_id=job_id,
            workspace=workspace / name,
            bus=EventBus(),
            log=logging.getLogger(f"fedstream.site.{name}"),
        )
        made = executor() if executor is not None else executor_for(job)
        return Site(context, made, send_events, job.config.client.forward, journal_events=journal_events)

    return make
