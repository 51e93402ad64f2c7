"""A site at work: build its model and trainer from the job, answer tasks, forward its events.

A failing trainer never takes the process down: the traceback goes to the site's log and the server gets a
result whose ``error`` names the exception. Before a result leaves, every event the task produced has been
acknowledged by the server (or the flush timed out, which is logged).
"""

from __future__ import annotations

from torch import nn

from fedstream.config import Job
from fedstream.link import SiteLink
from fedstream.messages import TRAIN, VALIDATE, Result, Task
from fedstream.pt.trainer import TaskInfo, Trainer
from fedstream.site.context import SiteContext, restore, run_as
from fedstream.site.outbox import Forwarder, Outbox


class Site:
    """One site's model, trainer, event bus and outbox."""

    def __init__(self, job: Job, context: SiteContext, link: SiteLink, *, flush_timeout_s: float = 120.0) -> None:
        self.context = context
        self.outbox = Outbox(context.name, link.send_events)
        forward = job.config.client.forward
        Forwarder(context.bus, self.outbox, forward.events, forward.prefix)
        self._job = job
        self._trainer: Trainer | None = None
        self._flush_timeout_s = flush_timeout_s

    def handle(self, task: Task) -> Result:
        """Run ``task`` and return its result (with ``error`` set if it failed)."""
        site = self.context.name
        token = run_as(self.context)
        try:
            trainer = self._trainer or self._start()
            trainer.set_weights(task.weights)
            info = TaskInfo(task.name, task.round, task.num_rounds)
            if task.name == TRAIN:
                trained = trainer.train(info)
                metrics = {key: float(value) for key, value in trained.metrics.items()}
                result = Result(task.id, site, trained.num_samples, metrics, trainer.get_weights())
            elif task.name == VALIDATE:
                validated = trainer.validate(info)
                metrics = {key: float(value) for key, value in validated.metrics.items()}
                result = Result(task.id, site, validated.num_samples, metrics)
            else:
                result = Result(task.id, site, error=f"unknown task {task.name!r}")
        except Exception as exc:
            self.context.log.exception("%s in round %d failed", task.name, task.round)
            result = Result(task.id, site, error=f"{type(exc).__name__}: {exc}")
        finally:
            if self._trainer is not None:
                self._trainer.release()
            restore(token)
        if not self.outbox.flush(self._flush_timeout_s):
            self.context.log.warning(
                "%d events not yet acknowledged by the server after %g s",
                self.outbox.unacknowledged,
                self._flush_timeout_s,
            )
        return result

    def _start(self) -> Trainer:
        model = self._job.component("model").build(nn.Module)
        trainer = self._job.component("client.trainer").build(Trainer)
        trainer.attach(self.context, model)
        trainer.setup()
        self._trainer = trainer
        return trainer

    def close(self) -> bool:
        """Deliver the remaining events; ``False`` if some could not be delivered."""
        return self.outbox.close(self._flush_timeout_s)
