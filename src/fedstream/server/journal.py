"""A deployed server's record of the site events it acknowledged, kept until its receivers have written them.

Why: the server acknowledges a site's events once its receiver hosts have them queued, and the hosts write
them a moment later, in batches. A server killed meanwhile (SIGKILL, an out-of-memory kill) would lose what
it had acknowledged and not written, and the sites, told it was delivered, would not send it again.

So the :class:`~fedstream.server.inbox.Inbox` appends each batch of new events here before it hands them
over (and so before the site hears the acknowledgement), which gives each event a *position*; each receiver
host records how far it has written: every event it was given before position P is written or given up.
A server that restarts in the middle of the job reads the file back: the inbox continues each site's
numbering (a batch sent again is not taken twice), and each receiver is given again the events of its
kinds from its mark on. What can repeat is what a receiver wrote in the instant before its mark was
recorded (MLflow keeps a metric logged twice with the same step, time and value once).

Lines (:mod:`fedstream.jsonlines`): ``{"next": P, "sites": {site: [session, handled]}, "marks": {name: P}}``
first; then ``{"site", "session", "handled", "at": P, "events": [[name, data], ...]}`` for a batch whose first
event has position P, and ``{"receiver": name, "below": P}`` for a mark. The file is written anew without
what every receiver has written after every 100,000 events, and removed when the job ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedstream.events import Forwarded
from fedstream.jsonlines import JsonLines
from fedstream.messages import WireEvent

log = logging.getLogger(__name__)

COMPACT_EVERY = 100_000
"""Events appended between two rewrites of the file without what is written."""


@dataclass
class Taken:
    """What the journal holds: each site's session and last handled number, each receiver's mark, and the
    events by position (with their site) from the oldest one kept."""

    sites: dict[str, tuple[str, int]] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)
    events: list[tuple[int, str, WireEvent]] = field(default_factory=list)
    next: int = 1

    def unwritten(self, receiver: str, kinds: Collection[str]) -> list[Forwarded]:
        """The events of ``kinds`` that ``receiver`` had not written, as they were fired the first time."""
        below = self.marks.get(receiver, 0)
        return [
            Forwarded(event.name, site, event.data, at)
            for at, site, event in self.events
            if at >= below and event.name in kinds
        ]


class EventJournal:
    """The server's events journal of one job at ``path``; ``oldest_unwritten`` gives the position of the
    oldest event a receiver still has to write (``None``: none), asked only while no batch is being handed
    over. A write that fails turns the journal off with one error in the log: events are still written."""

    def __init__(self, path: Path, oldest_unwritten: Callable[[], int | None]) -> None:
        self._file = JsonLines(
            path,
            "the server's events journal",
            "events are still written, but those acknowledged and not yet written would be lost if this server "
            "were killed",
        )
        self._oldest_unwritten = oldest_unwritten
        self._lock = threading.Lock()
        self._state = Taken()
        self._since_compaction = 0

    @property
    def sites(self) -> dict[str, tuple[str, int]]:
        """Each site's session and the last number handled in it."""
        with self._lock:
            return dict(self._state.sites)

    def open(self) -> Taken:
        """Take over what an earlier process of the server left for this job (nothing: empty) and begin the
        file anew with it."""
        with self._lock:
            self._state = _fold(self._file.read(_parse) or [])
            self._rewrite(self._state.events)
            if self._state.events:
                log.info(
                    "%d site events from before the restart are written again where a receiver had not written them",
                    len(self._state.events),
                )
            return Taken(dict(self._state.sites), dict(self._state.marks), list(self._state.events), self._state.next)

    def append(self, site: str, session: str, handled: int, events: Sequence[WireEvent]) -> int:
        """Record ``events`` of ``site`` (``handled`` is its last number after them); returns the position of
        the first. The caller hands them over only after this, and appends no other batch meanwhile."""
        with self._lock:
            if self._since_compaction >= COMPACT_EVERY:
                self._compact()
            at = self._state.next
            self._state.next += len(events)
            self._state.sites[site] = (session, handled)
            self._since_compaction += len(events)
            self._file.write(
                {
                    "site": site,
                    "session": session,
                    "handled": handled,
                    "at": at,
                    "events": [[event.name, event.data] for event in events],
                }
            )
            return at

    def mark(self, receiver: str, below: int) -> None:
        """``receiver`` has written (or given up) every event it was given before position ``below``."""
        with self._lock:
            self._state.marks[receiver] = below
            self._file.write({"receiver": receiver, "below": below})

    def close(self) -> None:
        """The job has ended: nothing in the journal is needed any more."""
        with self._lock:
            self._file.close(remove=True)

    def _compact(self) -> None:
        """Under the lock: write the file anew without the events every receiver has written."""
        self._since_compaction = 0
        oldest = self._oldest_unwritten()
        keep_from = self._state.next if oldest is None else oldest
        kept = [entry for entry in _fold(self._file.read(_parse) or []).events if entry[0] >= keep_from]
        self._rewrite(kept)

    def _rewrite(self, events: list[tuple[int, str, WireEvent]]) -> None:
        state = self._state
        header = {"next": state.next, "sites": state.sites, "marks": state.marks}
        self._file.start([header, *({"at": at, "site": site, "events": [[e.name, e.data]]} for at, site, e in events)])


def _parse(entry: Any) -> dict[str, Any]:
    """One line, checked: a header, a batch or a mark."""
    if "receiver" in entry:
        return {"receiver": str(entry["receiver"]), "below": int(entry["below"])}
    if "next" in entry:
        sites = {str(site): (str(session), int(handled)) for site, (session, handled) in entry["sites"].items()}
        marks = {str(name): int(below) for name, below in entry["marks"].items()}
        return {"next": int(entry["next"]), "sites": sites, "marks": marks}
    batch: dict[str, Any] = {
        "at": int(entry["at"]),
        "site": str(entry["site"]),
        "events": [WireEvent(str(name), dict(data)) for name, data in entry["events"]],
    }
    if "session" in entry:
        batch["session"] = (str(entry["session"]), int(entry["handled"]))
    return batch


def _fold(entries: list[dict[str, Any]]) -> Taken:
    """The state the lines of a journal describe, in order."""
    state = Taken()
    for entry in entries:
        if "receiver" in entry:
            state.marks[entry["receiver"]] = entry["below"]
        elif "next" in entry:
            state = Taken(entry["sites"], entry["marks"], [], entry["next"])
        else:
            state.events += [(entry["at"] + i, entry["site"], event) for i, event in enumerate(entry["events"])]
            state.next = max(state.next, entry["at"] + len(entry["events"]))
            if "session" in entry:
                state.sites[entry["site"]] = entry["session"]
    return state
