"""The server's view of its sites: send tasks, collect replies as they come, enforce task timeouts.

A workflow calls :meth:`Federation.dispatch` and reads :meth:`Dispatch.next_reply` until it has what it
needs. The link calls the ``task_started`` / ``result_received`` / ``events_received`` methods from its own
threads; everything the workflow sees passes through one queue, so the workflow itself is single-threaded.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fedstream.events import TASK_DONE, TASK_STARTED, TASKS_SENT, Event, EventBus
from fedstream.link import ServerLink
from fedstream.messages import EventBatch, Result, Task, Weights
from fedstream.server.inbox import Inbox
from fedstream.server.models import ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """The outcome of one task at one site: a result, or why there is none."""

    site: str
    task: str
    round: int
    result: Result | None
    error: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.result is not None and not self.error


@dataclass(frozen=True)
class TasksSent:
    """Data of the ``tasks_sent`` event: task ``task`` of ``round`` went to ``sites``."""

    task: str
    round: int
    sites: tuple[str, ...]


@dataclass(frozen=True)
class TaskStarted:
    """Data of the ``task_started`` event."""

    site: str
    task: str
    round: int


class Federation:
    """Sends tasks to sites through a link and turns what comes back into :class:`Reply` objects."""

    def __init__(self, sites: Sequence[str], bus: EventBus, models: ModelStore) -> None:
        self.sites = tuple(sites)
        self.bus = bus
        self.models = models
        self.inbox = Inbox(bus)
        self._link: ServerLink | None = None
        self._inbound: queue.Queue[tuple[str, str, Result | None, float]] = queue.Queue()
        self._ids = itertools.count(1)

    def connect(self, link: ServerLink) -> None:
        """Use ``link`` to reach the sites."""
        self._link = link

    # -- called by the link, from its threads -------------------------------------------------------
    def task_started(self, task_id: str) -> None:
        self._inbound.put(("started", task_id, None, time.monotonic()))

    def result_received(self, site: str, result: Result) -> None:
        if result.site != site:
            log.warning(
                "a result claiming to be from %r arrived on %r's link; treating it as %r's",
                result.site,
                site,
                site,
            )
        self._inbound.put(("result", result.task_id, result, time.monotonic()))

    def events_received(self, site: str, batch: EventBatch) -> int:
        if batch.site != site:
            log.warning(
                "events claiming to be from %r arrived on %r's link; stamping them as %r's",
                batch.site,
                site,
                site,
            )
        return self.inbox.receive(site, batch)

    # -- used by workflows ----------------------------------------------------------------------------
    def dispatch(
        self, name: str, round: int, num_rounds: int, weights: Weights, sites: Sequence[str], timeout_s: float
    ) -> Dispatch:
        """Send task ``name`` with ``weights`` to each of ``sites``; ``timeout_s`` 0 means no time limit."""
        if self._link is None:
            raise RuntimeError("Federation.dispatch before connect()")
        tasks = {}
        for site in sites:
            task = Task(
                id=f"t{next(self._ids)}",
                site=site,
                name=name,
                round=round,
                num_rounds=num_rounds,
                weights=weights,
            )
            tasks[task.id] = task
        dispatch = Dispatch(self, tasks, timeout_s)
        self.bus.fire(Event(TASKS_SENT, TasksSent(name, round, tuple(sites))))
        for task in tasks.values():
            self._link.send(task)
        return dispatch

    def _cancel(self, task_ids: set[str]) -> None:
        if self._link is not None and task_ids:
            self._link.cancel(task_ids)

    def _next_inbound(self, timeout: float | None) -> tuple[str, str, Result | None, float] | None:
        try:
            return self._inbound.get(timeout=timeout)
        except queue.Empty:
            return None


class Dispatch:
    """The outstanding tasks of one :meth:`Federation.dispatch` call."""

    def __init__(self, federation: Federation, tasks: dict[str, Task], timeout_s: float) -> None:
        self._federation = federation
        self._tasks = tasks
        self._timeout_s = timeout_s
        self._started: dict[str, float] = {}
        self.pending = set(tasks)

    def next_reply(self, wait_s: float | None = None) -> Reply | None:
        """The next reply, a timeout reply for a task past its deadline, or ``None`` after ``wait_s`` seconds."""
        give_up = None if wait_s is None else time.monotonic() + wait_s
        while self.pending:
            now = time.monotonic()
            expired = self._expired(now)
            if expired is not None:
                return expired
            timeout = self._until_next_deadline(now)
            if give_up is not None:
                if now >= give_up:
                    return None
                timeout = give_up - now if timeout is None else min(timeout, give_up - now)
            item = self._federation._next_inbound(timeout)
            if item is None:
                continue
            kind, task_id, result, at = item
            if task_id not in self.pending:
                if kind == "result":
                    log.info("ignoring a late result for task %s", task_id)
                continue
            task = self._tasks[task_id]
            if kind == "started":
                self._started[task_id] = at
                self._federation.bus.fire(Event(TASK_STARTED, TaskStarted(task.site, task.name, task.round)))
                continue
            assert result is not None
            self.pending.discard(task_id)
            began = self._started.get(task_id, at)
            return self._done(Reply(task.site, task.name, task.round, result, result.error, at - began))
        return None

    def cancel(self) -> None:
        """Give up on the tasks still pending; their late results will be ignored."""
        self._federation._cancel(self.pending)
        self.pending = set()

    def _done(self, reply: Reply) -> Reply:
        self._federation.bus.fire(Event(TASK_DONE, reply))
        return reply

    def _expired(self, now: float) -> Reply | None:
        if not self._timeout_s:
            return None
        for task_id, began in self._started.items():
            if task_id in self.pending and now - began >= self._timeout_s:
                self.pending.discard(task_id)
                self._federation._cancel({task_id})
                task = self._tasks[task_id]
                return self._done(
                    Reply(
                        task.site,
                        task.name,
                        task.round,
                        None,
                        f"timed out after {self._timeout_s:g} s",
                        now - began,
                    )
                )
        return None

    def _until_next_deadline(self, now: float) -> float | None:
        if not self._timeout_s:
            return None
        deadlines = [began + self._timeout_s for task_id, began in self._started.items() if task_id in self.pending]
        return max(0.0, min(deadlines) - now) if deadlines else None
