"""The server's view of its sites: who has joined, what they were sent, and what came back.

The federation is the :class:`~fedstream.link.ServerEndpoint` of the job's link: it keeps the sites that
joined, routes each started task and each result to the :class:`~fedstream.server.dispatch.Dispatch` it
belongs to, and passes event batches to the :class:`~fedstream.server.inbox.Inbox`. Workflows use
:meth:`Federation.dispatch`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedstream.errors import JobFailed
from fedstream.events import EventBus
from fedstream.link import ServerLink
from fedstream.messages import EventBatch, Payload, Result, Task
from fedstream.server.dispatch import Dispatch, TasksSent
from fedstream.server.inbox import Inbox

if TYPE_CHECKING:  # the journal knows the workflows' round events, which know the federation
    from fedstream.server.journal import EventJournal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteJoined:
    """``site`` is set up and takes tasks (again, if it had left)."""

    name: ClassVar[str] = "site_joined"
    site: str


@dataclass(frozen=True)
class SiteLeft:
    """``site`` is gone: its host exited or disconnected."""

    name: ClassVar[str] = "site_left"
    site: str
    reason: str


class Federation:
    """The job's sites, reached through a link.

    Args:
        sites: the job's sites, in the job's order; only these may join.
        bus: the server's event bus (task and membership events are fired on it).
        journal: where a deployed server records the sites' events (:class:`~fedstream.server.inbox.Inbox`).
    """

    def __init__(self, sites: Sequence[str], bus: EventBus, journal: EventJournal | None = None) -> None:
        self.sites = tuple(sites)
        self.bus = bus
        self.inbox = Inbox(bus, journal)
        self._link: ServerLink | None = None
        self._lock = threading.Lock()
        self._joined: set[str] = set()
        self._routes: dict[str, tuple[Task, Dispatch]] = {}
        # A task's id says what it is (round, kind, site, and which of that round's tasks of that kind for the
        # site): a server resumed after a restart sends the interrupted round's tasks under the ids they had,
        # so a site answers one it has already done with the result it has, instead of training again.
        self._sent: Counter[tuple[int, str, str]] = Counter()
        self._aborted = ""

    def start(self, link: ServerLink) -> None:
        """Reach the sites through ``link``."""
        self._link = link
        link.start(self)

    # -- ServerEndpoint: called by the link, from its threads ------------------------------------------------
    def site_joined(self, site: str) -> None:
        if site not in self.sites:
            log.error("%r tried to join, but the job's sites are %s; ignored", site, ", ".join(self.sites))
            return
        with self._lock:
            self._joined.add(site)
        self.bus.fire(SiteJoined(site))

    def site_left(self, site: str, reason: str) -> None:
        with self._lock:
            self._joined.discard(site)
        self.bus.fire(SiteLeft(site, reason))

    def task_started(self, task_id: str) -> None:
        route = self._routes.get(task_id)
        if route is not None:
            route[1].started(task_id, time.monotonic())

    def result_received(self, site: str, result: Result) -> None:
        with self._lock:
            route = self._routes.pop(result.task_id, None)
        if route is None:
            log.info("ignoring a result from %s for task %s, which is no longer awaited", site, result.task_id)
            return
        task, dispatch = route
        if task.site != site or result.site != site:
            log.error(
                "%s answered task %s, which was sent to %s (claiming to be %r); refused",
                site,
                result.task_id,
                task.site,
                result.site,
            )
            with self._lock:
                self._routes[result.task_id] = route
            return
        dispatch.answered(result, time.monotonic())

    def events_received(self, site: str, batch: EventBatch) -> int:
        if batch.site != site:
            log.warning(
                "events claiming to be from %r arrived on %r's link; stamping them as %r's", batch.site, site, site
            )
        return self.inbox.receive(site, batch)

    def abort(self, reason: str) -> None:
        """Stop the job: outstanding and later dispatches raise :class:`~fedstream.errors.JobFailed`."""
        with self._lock:
            self._aborted = self._aborted or reason
            dispatches = {dispatch for _, dispatch in self._routes.values()}
        log.error("aborting the job: %s", reason)
        for dispatch in dispatches:
            dispatch.abort(reason)

    # -- used by workflows ------------------------------------------------------------------------------------
    @property
    def joined(self) -> list[str]:
        """The sites that are set up now, in the job's order."""
        with self._lock:
            return [site for site in self.sites if site in self._joined]

    def dispatch(
        self, kind: str, round: int, num_rounds: int, payloads: Mapping[str, Payload], timeout_s: float
    ) -> Dispatch:
        """Send a ``kind`` task to each site of ``payloads``, with its payload; ``timeout_s`` 0 means no limit."""
        if self._link is None:
            raise RuntimeError("Federation.dispatch before start()")
        tasks = {}
        for site, payload in payloads.items():
            self._sent[round, kind, site] += 1
            task_id = f"{round}.{kind}.{site}.{self._sent[round, kind, site]}"
            task = Task(task_id, site, kind, round, num_rounds, payload)
            tasks[task.id] = task
        dispatch = Dispatch(tasks, timeout_s, self.bus, self._cancel)
        with self._lock:
            if self._aborted:
                raise JobFailed(self._aborted)
            self._routes.update((task_id, (task, dispatch)) for task_id, task in tasks.items())
        self.bus.fire(TasksSent(kind, round, tuple(payloads)))
        for task in tasks.values():
            self._link.send(task)
        return dispatch

    def _cancel(self, task_ids: set[str]) -> None:
        with self._lock:
            for task_id in task_ids:
                self._routes.pop(task_id, None)
        if self._link is not None and task_ids:
            self._link.cancel(task_ids)
