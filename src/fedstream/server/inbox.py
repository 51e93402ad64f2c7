"""The server's end of event delivery: drop duplicates, keep order, fire each event once.

Each site numbers its events from 1 within a session. A batch may repeat events already handled (a resend
after a lost acknowledgement): those are skipped. A batch that starts past the next expected number (a lost
batch) is not handled; the acknowledgement tells the site where to resume. A new session of a site (set up
again after its host restarted) is taken from the number its first batch starts at: 1 for a new site, more
for one whose earlier events a previous server process acknowledged (a site sends one batch at a time, so
its first batch to this server is its oldest unacknowledged one).

A deployed server records each batch of new events in its :class:`~fedstream.server.journal.EventJournal`
before it fires them (so before the site hears the acknowledgement); each fired event carries its position
there. A server restarted in the middle of the job takes each site's session and number from the journal.

A deployed site puts a :data:`~fedstream.messages.TASK_STARTED` event into its stream as it starts each
task; the inbox takes it out. A site whose process was killed in the middle of a task runs that task again
in its next process (the server sends it again), and its code logs the same steps again: a record (an event
with a ``key`` and a ``step``) of such a second run is dropped when the first run logged its series (event
name, kind and key) at that step or a later one. The first run's records stand, the second adds only the
steps the first had not reached, and nothing is logged twice. The count of dropped records is ``repeats``.
What each site's current task has logged is recorded in the journal with each batch, so a server restarted
while a site's process also restarts in the middle of the same task still knows what the first run logged.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedstream.events import EventBus, Forwarded
from fedstream.messages import TASK_STARTED, EventBatch, WireEvent

if TYPE_CHECKING:  # the journal knows the workflows' round events, which know the federation
    from fedstream.server.journal import EventJournal

log = logging.getLogger(__name__)


class Inbox:
    """Per-site sequence tracking in front of the server's event bus (and its ``journal``, if any)."""

    def __init__(self, bus: EventBus, journal: EventJournal | None = None) -> None:
        self._bus = bus
        self._journal = journal
        self._handled: dict[str, int] = defaultdict(int)
        self._sessions: dict[str, str] = {}
        for site, (session, handled) in (journal.sites if journal else {}).items():
            self._sessions[site], self._handled[site] = session, handled
        self._lock = threading.Lock()  # one batch at a time: events reach the receivers in journal order
        self._tasks: dict[str, _TaskSteps] = defaultdict(_TaskSteps)
        for site, steps in (journal.tasks if journal else {}).items():
            self._tasks[site] = _TaskSteps.restore(steps)
        self.received: dict[str, int] = defaultdict(int)
        self.duplicates: dict[str, int] = defaultdict(int)
        self.repeats: dict[str, int] = defaultdict(int)

    def receive(self, site: str, batch: EventBatch) -> int:
        """Fire the new events of ``batch`` as coming from ``site``; returns the last sequence number handled."""
        with self._lock:
            known = self._sessions.get(site)
            if known != batch.session:
                if known is not None:
                    log.warning("%s was set up again: its events are numbered anew", site)
                elif batch.first_seq > 1:
                    log.info("%s continues its events from #%d", site, batch.first_seq)
                self._sessions[site] = batch.session
                self._handled[site] = batch.first_seq - 1
            handled = self._handled[site]
            skip = handled + 1 - batch.first_seq
            if skip < 0:
                log.warning(
                    "%s: events from #%d arrived before #%d; asking for a resend", site, batch.first_seq, handled + 1
                )
                return handled
            self.duplicates[site] += min(skip, len(batch.events))
            arrived = batch.events[skip:]
            self._handled[site] = handled + len(arrived)
            steps = self._tasks[site]
            fresh, repeats = steps.new(site, arrived)
            self.repeats[site] += repeats

            def fire(at: int) -> None:
                for i, event in enumerate(fresh):
                    self._bus.fire(Forwarded(event.name, site, event.data, at + i if at else 0))

            if self._journal is not None and self._handled[site] > handled:  # also for markers alone
                task = steps.record() if steps.task else None
                self._journal.append(site, batch.session, self._handled[site], fresh, fire, task)
            else:
                fire(0)
            self.received[site] += len(fresh)
            return self._handled[site]


@dataclass
class _TaskSteps:
    """The steps one site's current task has logged, per series; while the task runs again, the steps its
    earlier run had logged."""

    task: str = ""
    last: dict[tuple[str, Any, Any], int] = field(default_factory=dict)
    logged: dict[tuple[str, Any, Any], int] = field(default_factory=dict)

    def new(self, site: str, events: list[WireEvent]) -> tuple[list[WireEvent], int]:
        """``events`` without the task markers and without the records an earlier run of the task logged, and
        how many records were left out."""
        if not self.task and all(event.name != TASK_STARTED for event in events):
            return events, 0  # a site that marks no task (a simulator's): nothing to tell apart, nor to track
        kept: list[WireEvent] = []
        repeats = 0
        for event in events:
            if event.name == TASK_STARTED:
                self._started(site, str(event.data.get("task")))
                continue
            step = event.data.get("step")
            if isinstance(step, int) and "key" in event.data:
                series = (event.name, event.data.get("kind"), event.data["key"])
                if step <= self.logged.get(series, -1):
                    repeats += 1
                    continue
                self.last[series] = max(step, self.last.get(series, step))
            kept.append(event)
        return kept, repeats

    def record(self) -> dict[str, Any]:
        """This state as JSON values (for the journal): the task, and each series' last and logged steps."""
        return {
            "task": self.task,
            "last": [[*series, step] for series, step in self.last.items()],
            "logged": [[*series, step] for series, step in self.logged.items()],
        }

    @classmethod
    def restore(cls, record: dict[str, Any]) -> _TaskSteps:
        """The state :meth:`record` gave (as the journal read it back, checked)."""

        def steps(entries: list[list[Any]]) -> dict[tuple[str, Any, Any], int]:
            return {(name, kind, key): step for name, kind, key, step in entries}

        return cls(record["task"], steps(record["last"]), steps(record["logged"]))

    def _started(self, site: str, task: str) -> None:
        if task != self.task:
            self.task, self.last, self.logged = task, {}, {}
        elif self.last:
            log.info(
                "%s runs task %s again (its process restarted): the steps its earlier run logged are not logged again",
                site,
                task,
            )
            self.logged = dict(self.last)
