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
    """The outstanding tasks of one :meth:`Federation.dispatch` call.

    Every deadline of a task counts from the moment the task started at its site, never from the dispatch: a
    site that waits for its turn (the simulator runs a few sites at a time) is not late. A task is given up
    when it runs longer than ``timeout_s``, or, once :meth:`give_up_late` was called, when it runs longer
    than the sites that already answered by more than the grace period.
    """

    def __init__(self, federation: Federation, tasks: dict[str, Task], timeout_s: float) -> None:
        self._federation = federation
        self._tasks = tasks
        self._timeout_s = timeout_s
        self._started: dict[str, float] = {}
        self._late_after_s: float | None = None  # a started task is late after running this long
        self._late_reason = ""
        self.pending = set(tasks)

    def next_reply(self) -> Reply | None:
        """The next reply (a result, or a task given up at its deadline); ``None`` when nothing is pending."""
        while self.pending:
            now = time.monotonic()
            expired = self._expired(now)
            if expired is not None:
                return expired
            item = self._federation._next_inbound(self._until_next_deadline(now))
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

    def give_up_late(self, longest_s: float, grace_s: float) -> None:
        """From now on, give up a task that runs ``grace_s`` longer than ``longest_s`` (what the sites that
        answered took), counted from its own start."""
        self._late_after_s = longest_s + grace_s
        self._late_reason = (
            f"left out: still running {grace_s:g} s after the sites that answered had finished "
            "(wait_after_min_clients_s)"
        )

    def cancel(self) -> None:
        """Give up on the tasks still pending; their late results will be ignored."""
        self._federation._cancel(self.pending)
        self.pending = set()

    def _done(self, reply: Reply) -> Reply:
        self._federation.bus.fire(Event(TASK_DONE, reply))
        return reply

    def _deadline(self, task_id: str) -> tuple[float, str] | None:
        """When a started task is given up, and why; ``None`` for no deadline."""
        began = self._started.get(task_id)
        if began is None:
            return None
        limits = []
        if self._timeout_s:
            limits.append((began + self._timeout_s, f"timed out after {self._timeout_s:g} s"))
        if self._late_after_s is not None:
            limits.append((began + self._late_after_s, self._late_reason))
        return min(limits) if limits else None

    def _expired(self, now: float) -> Reply | None:
        for task_id in sorted(self.pending):
            deadline = self._deadline(task_id)
            if deadline is not None and now >= deadline[0]:
                self.pending.discard(task_id)
                self._federation._cancel({task_id})
                task = self._tasks[task_id]
                duration = now - self._started[task_id]
                return self._done(Reply(task.site, task.name, task.round, None, deadline[1], duration))
        return None

    def _until_next_deadline(self, now: float) -> float | None:
        deadlines = [d[0] for task_id in self.pending if (d := self._deadline(task_id)) is not None]
        return max(0.0, min(deadlines) - now) if deadlines else None
