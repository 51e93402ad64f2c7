"""The outstanding tasks of one send to several sites, and the replies a workflow reads from them.

A workflow asks the :class:`~fedstream.server.federation.Federation` for a :class:`Dispatch` and reads
:meth:`Dispatch.next_reply` until it has what it needs. Several dispatches may be outstanding at once; each
has its own queue, filled by the federation from the link's threads, so the workflow itself is
single-threaded.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from fedstream.errors import JobFailed
from fedstream.events import EventBus
from fedstream.messages import Failure, Result, Task

WAKE_S = 0.5
"""The longest the workflow waits for a reply at once: Python runs a signal's handler (Ctrl-C, SIGTERM) only
when the main thread runs, and a wait with no end is not woken when the signal goes to another thread."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    """The outcome of one task at one site: a result, or the failure that left the site without one."""

    site: str
    kind: str
    round: int
    result: Result | None
    failure: Failure | None
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.result is not None and self.failure is None


@dataclass(frozen=True)
class TasksSent:
    """Tasks of ``kind`` in ``round`` went to ``sites``."""

    name: ClassVar[str] = "tasks_sent"
    kind: str
    round: int
    sites: tuple[str, ...]


@dataclass(frozen=True)
class TaskStarted:
    """``site`` began its ``kind`` task of ``round``."""

    name: ClassVar[str] = "task_started"
    site: str
    kind: str
    round: int


@dataclass(frozen=True)
class TaskDone:
    """A task ended, well or not."""

    name: ClassVar[str] = "task_done"
    reply: Reply


class Dispatch:
    """Tasks sent together, and their deadlines.

    Every deadline of a task counts from the moment its site began it, never from the send: a site that
    waits for its turn (the simulator runs a few sites at a time) is not late. A task is given up when it
    runs longer than ``timeout_s`` (0: no limit), or, once :meth:`give_up_late` was called, when it runs
    longer than the sites that already answered did by more than the grace period.
    """

    def __init__(
        self, tasks: dict[str, Task], timeout_s: float, bus: EventBus, cancel: Callable[[set[str]], None]
    ) -> None:
        self._tasks = tasks
        self._timeout_s = timeout_s
        self._bus = bus
        self._cancel = cancel
        self._inbound: queue.Queue[tuple[str, Result | None, float]] = queue.Queue()
        self._started: dict[str, float] = {}
        self._late_after_s: float | None = None
        self._grace_s = 0.0
        self._aborted = ""
        self.pending = set(tasks)

    # -- fed by the federation, from the link's threads ----------------------------------------------------
    def started(self, task_id: str, at: float) -> None:
        self._inbound.put((task_id, None, at))

    def answered(self, result: Result, at: float) -> None:
        self._inbound.put((result.task_id, result, at))

    def abort(self, reason: str) -> None:
        """The job cannot go on: :meth:`next_reply` raises :class:`~fedstream.errors.JobFailed` with ``reason``."""
        self._aborted = reason
        self._inbound.put(("", None, 0.0))

    # -- read by the workflow ---------------------------------------------------------------------------------
    def next_reply(self) -> Reply | None:
        """The next reply (a result, or a task given up at its deadline); ``None`` when nothing is pending.

        Raises :class:`~fedstream.errors.JobFailed` if the job was aborted meanwhile.
        """
        while self.pending:
            if self._aborted:
                self.cancel()
                raise JobFailed(self._aborted)
            now = time.monotonic()
            expired = self._expired(now)
            if expired is not None:
                return expired
            try:
                task_id, result, at = self._inbound.get(timeout=min(self._until_next_deadline(now), WAKE_S))
            except queue.Empty:
                continue
            if task_id not in self.pending:
                continue
            task = self._tasks[task_id]
            if result is None:
                self._started[task_id] = at
                self._bus.fire(TaskStarted(task.site, task.kind, task.round))
                continue
            self.pending.discard(task_id)
            duration = at - self._started.get(task_id, at)
            return self._done(Reply(task.site, task.kind, task.round, result, result.failure, duration))
        return None

    def give_up_late(self, longest_s: float, grace_s: float) -> None:
        """From now on, give up a task that runs ``grace_s`` longer than ``longest_s`` (what the sites that
        answered took), counted from its own start."""
        self._late_after_s = longest_s + grace_s
        self._grace_s = grace_s

    def cancel(self) -> None:
        """Give up every task still pending; their results will be ignored."""
        if self.pending:
            self._cancel(set(self.pending))
        self.pending = set()

    def _done(self, reply: Reply) -> Reply:
        self._bus.fire(TaskDone(reply))
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
            why = (
                f"left out: still running {self._grace_s:g} s after the sites that answered had finished "
                "(wait_after_min_clients_s)"
            )
            limits.append((began + self._late_after_s, why))
        return min(limits) if limits else None

    def _expired(self, now: float) -> Reply | None:
        for task_id in sorted(self.pending):
            deadline = self._deadline(task_id)
            if deadline is not None and now >= deadline[0]:
                self.pending.discard(task_id)
                self._cancel({task_id})
                task = self._tasks[task_id]
                failure = Failure(task.site, task.kind, deadline[1])
                return self._done(Reply(task.site, task.kind, task.round, None, failure, now - self._started[task_id]))
        return None

    def _until_next_deadline(self, now: float) -> float:
        deadlines = [d[0] for task_id in self.pending if (d := self._deadline(task_id)) is not None]
        return max(0.0, min(deadlines) - now) if deadlines else float("inf")
