"""A deployed server's record of the events it has given its receivers, kept until they have written them.

Why: the server acknowledges a site's events once its receiver hosts have them queued, and the hosts write
them a moment later, in batches. A server killed meanwhile (SIGKILL, an out-of-memory kill) would lose what
it had acknowledged and not written, and the sites, told it was delivered, would not send it again. The
same holds for the server's own record of each completed round (its global metrics).

So the :class:`~fedstream.server.inbox.Inbox` appends each batch of new events here before it hands them
over (and so before the site hears the acknowledgement), and the runtime each completed round; that gives
each event a *position*, in the order the receivers are given them. Each receiver host records how far it
has written: every event it was given before position P is written or given up. A server that restarts in
the middle of the job reads the file back: the inbox continues each site's numbering (a batch sent again is
not taken twice), and each receiver is given again the events of its kinds from its mark on. A receiver
is so given again what it wrote in the instant before its mark was recorded, and writes it once: MLflow's
SQL stores keep a metric logged twice with the same step, time and value once, and TensorBoard's receiver
finds in its files how far it has written (:mod:`fedstream.tracking.tensorboard_receiver`).

The inbox also records, with each batch, what the site's current task has logged (see
:mod:`fedstream.server.inbox`): a server restarted while the site's process also restarts in the middle of
that task still drops the steps the task's first run logged.

Lines (:mod:`fedstream.jsonlines`): ``{"next": P, "sites": {site: [session, handled]}, "tasks": {site:
steps}, "marks": {name: P}, "last_round": R}`` first; then ``{"at": P, "site", "session", "handled",
"events": [[name, data], ...], "task": steps}`` for a batch whose first event has position P (``task`` only
for a site that marks its tasks), ``{"at": P, "round": summary}`` for a completed round, and
``{"receiver": name, "below": P}`` for a mark. The file is written anew without what every receiver has
written after every 100,000 events, and removed when the job ends."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedstream.events import Event, Forwarded
from fedstream.jsonlines import JsonLines
from fedstream.messages import Failure, WireEvent
from fedstream.workflows.base import RoundCompleted, RoundSummary

log = logging.getLogger(__name__)

COMPACT_EVERY = 100_000
"""Events appended between two rewrites of the file without what is written."""


@dataclass
class Taken:
    """What the journal holds: each site's session and last handled number, what each site's current task has
    logged, each receiver's mark, and the events by position from the oldest one kept: the sites' (with their
    site) and the completed rounds; and the last round recorded."""

    sites: dict[str, tuple[str, int]] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)
    events: list[tuple[int, str, WireEvent]] = field(default_factory=list)
    rounds: list[tuple[int, RoundSummary]] = field(default_factory=list)
    next: int = 1
    last_round: int = 0
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def unwritten(self, receiver: str, kinds: Collection[str]) -> list[Event]:
        """The events of ``kinds`` that ``receiver`` had not written, as they were fired the first time."""
        below = self.marks.get(receiver, 0)
        found: list[tuple[int, Event]] = [
            (at, Forwarded(event.name, site, event.data, at))
            for at, site, event in self.events
            if at >= below and event.name in kinds
        ]
        if RoundCompleted.name in kinds:
            found += [(at, RoundCompleted(summary, at)) for at, summary in self.rounds if at >= below]
        return [event for _, event in sorted(found, key=lambda entry: entry[0])]

    def copy(self) -> Taken:
        return Taken(
            dict(self.sites),
            dict(self.marks),
            list(self.events),
            list(self.rounds),
            self.next,
            self.last_round,
            dict(self.tasks),
        )


class EventJournal:
    """The server's events journal of one job at ``path``; ``oldest_unwritten`` gives the position of the
    oldest event a receiver still has to write (``None``: none), asked only while nothing is being handed
    over. A write that fails turns the journal off with one error in the log: events are still written."""

    def __init__(self, path: Path, oldest_unwritten: Callable[[], int | None]) -> None:
        self._file = JsonLines(
            path,
            "the server's events journal",
            "events are still written, but those acknowledged and not yet written would be lost if this server "
            "were killed",
        )
        self._oldest_unwritten = oldest_unwritten
        self._order = threading.Lock()  # one hand-over at a time: receivers are given events in journal order
        self._lock = threading.Lock()  # the file and the state
        self._state = Taken()
        self._since_compaction = 0

    @property
    def sites(self) -> dict[str, tuple[str, int]]:
        """Each site's session and the last number handled in it."""
        with self._lock:
            return dict(self._state.sites)

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """What each site's current task has logged, as the inbox recorded it."""
        with self._lock:
            return dict(self._state.tasks)

    def open(self) -> Taken:
        """Take over what an earlier process of the server left for this job (nothing: empty) and begin the
        file anew with it."""
        with self._lock:
            self._state = _fold(self._file.read(_parse) or [])
            self._rewrite(self._state)
            count = len(self._state.events) + len(self._state.rounds)
            if count:
                log.info("%d events from before the restart are written where a receiver had not written them", count)
            return self._state.copy()

    def append(
        self,
        site: str,
        session: str,
        handled: int,
        events: Sequence[WireEvent],
        hand_over: Callable[[int], None],
        task: dict[str, Any] | None = None,
    ) -> None:
        """Record ``events`` of ``site`` (``handled`` is its last number after them; ``task``, what its current
        task has logged with them), then call ``hand_over`` with the position of the first, before anything
        else is recorded."""
        line: dict[str, Any] = {"site": site, "session": session, "handled": handled}
        line["events"] = [[e.name, e.data] for e in events]
        if task is not None:
            line["task"] = task
        with self._order:
            with self._lock:
                self._state.sites[site] = (session, handled)
                if task is not None:
                    self._state.tasks[site] = task
                at = self._record(line, len(events))
            hand_over(at)

    def append_round(self, summary: RoundSummary, hand_over: Callable[[int], None]) -> None:
        """Record a completed round, then call ``hand_over`` with its position, before anything else is
        recorded. A round recorded already is not again: a server killed after announcing a round and
        before its checkpoint runs that round again, and its receivers have it (or get it from here)."""
        with self._order:
            with self._lock:
                if summary.round <= self._state.last_round:
                    log.info("round %d was recorded before the restart; its receivers have it", summary.round)
                    return
                self._state.last_round = summary.round
                at = self._record({"round": asdict(summary)}, 1)
            hand_over(at)

    def mark(self, receiver: str, below: int) -> None:
        """``receiver`` has written (or given up) every event it was given before position ``below``."""
        with self._lock:
            self._state.marks[receiver] = below
            self._file.write({"receiver": receiver, "below": below})

    def close(self) -> None:
        """The job has ended: nothing in the journal is needed any more."""
        with self._lock:
            self._file.close(remove=True)

    def _record(self, line: dict[str, Any], count: int) -> int:
        """Under both locks: write ``line`` of ``count`` events at the next position; returns it."""
        if self._since_compaction >= COMPACT_EVERY:
            self._compact()
        at = self._state.next
        self._state.next += count
        self._since_compaction += count
        self._file.write({"at": at, **line})
        return at

    def _compact(self) -> None:
        """Under both locks: write the file anew without the events every receiver has written."""
        self._since_compaction = 0
        oldest = self._oldest_unwritten()
        keep_from = self._state.next if oldest is None else oldest
        held = _fold(self._file.read(_parse) or [])
        held.events = [entry for entry in held.events if entry[0] >= keep_from]
        held.rounds = [entry for entry in held.rounds if entry[0] >= keep_from]
        self._rewrite(held)

    def _rewrite(self, held: Taken) -> None:
        """Begin the file anew with the state and the events of ``held``."""
        state = self._state
        header = {
            "next": state.next,
            "sites": state.sites,
            "tasks": state.tasks,
            "marks": state.marks,
            "last_round": state.last_round,
        }
        lines: list[tuple[int, dict[str, Any]]] = [
            *((at, {"at": at, "site": site, "events": [[e.name, e.data]]}) for at, site, e in held.events),
            *((at, {"at": at, "round": asdict(summary)}) for at, summary in held.rounds),
        ]
        self._file.start([header, *(line for _, line in sorted(lines, key=lambda entry: entry[0]))])


def _parse(entry: Any) -> dict[str, Any]:
    """One line, checked: a header, a batch, a round or a mark."""
    if "receiver" in entry:
        return {"receiver": str(entry["receiver"]), "below": int(entry["below"])}
    if "next" in entry:
        sites = {str(site): (str(session), int(handled)) for site, (session, handled) in entry["sites"].items()}
        marks = {str(name): int(below) for name, below in entry["marks"].items()}
        tasks = {str(site): _task_steps(steps) for site, steps in entry.get("tasks", {}).items()}
        return {
            "next": int(entry["next"]),
            "sites": sites,
            "tasks": tasks,
            "marks": marks,
            "last_round": int(entry["last_round"]),
        }
    if "round" in entry:
        data = dict(entry["round"])
        data["failed"] = [Failure(**failure) for failure in data["failed"]]
        return {"at": int(entry["at"]), "round": RoundSummary(**data)}
    batch: dict[str, Any] = {
        "at": int(entry["at"]),
        "site": str(entry["site"]),
        "events": [WireEvent(str(name), dict(data)) for name, data in entry["events"]],
    }
    if "session" in entry:
        batch["session"] = (str(entry["session"]), int(entry["handled"]))
    if "task" in entry:
        batch["task"] = _task_steps(entry["task"])
    return batch


def _task_steps(value: Any) -> dict[str, Any]:
    """A site's task steps as the inbox recorded them, checked (a damaged line is refused here)."""

    def series(entries: Any) -> list[list[Any]]:
        return [[str(name), kind, key, int(step)] for name, kind, key, step in entries]

    return {"task": str(value["task"]), "last": series(value["last"]), "logged": series(value["logged"])}


def _fold(entries: list[dict[str, Any]]) -> Taken:
    """The state the lines of a journal describe, in order."""
    state = Taken()
    for entry in entries:
        if "receiver" in entry:
            state.marks[entry["receiver"]] = entry["below"]
        elif "next" in entry:
            state = Taken(
                entry["sites"], entry["marks"], next=entry["next"], last_round=entry["last_round"], tasks=entry["tasks"]
            )
        elif "round" in entry:
            state.rounds.append((entry["at"], entry["round"]))
            state.next = max(state.next, entry["at"] + 1)
            state.last_round = max(state.last_round, entry["round"].round)
        else:
            state.events += [(entry["at"] + i, entry["site"], event) for i, event in enumerate(entry["events"])]
            state.next = max(state.next, entry["at"] + len(entry["events"]))
            if "session" in entry:
                state.sites[entry["site"]] = entry["session"]
            if "task" in entry:
                state.tasks[entry["site"]] = entry["task"]
    return state
