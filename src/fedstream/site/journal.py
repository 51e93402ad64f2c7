"""A deployed site's outgoing events on disk, so that a killed site process loses none of them.

The :class:`~fedstream.site.outbox.Outbox` writes each event here as it is logged, and each acknowledgement
as it arrives. When a site's process is killed (SIGKILL, an out-of-memory kill, its client killed), the next
process of that site in the same job reads the journal back and resends, in the same session, what the server
had not acknowledged: the server's sequence check keeps every event exactly once.

The file holds one JSON document per line: ``{"session": S, "acked": N}`` first, then each event as
``[name, data]`` in the order of its number (N+1, N+2, ...), and ``{"acked": M}`` as the server acknowledges.
A line is written with one ``write`` call when its event is logged, so the operating system keeps it through
a kill of the process (a power cut is not covered: there is no fsync per event). A file that has grown is
rewritten with only the unacknowledged events once everything is acknowledged.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedstream.jsonlines import JsonLines
from fedstream.messages import WireEvent

COMPACT_AFTER_LINES = 10_000


class Journal:
    """The journal file of one site's outbox at ``path``; a write that fails turns it off (with one error in
    the log): the events still travel, only their copy on disk is missing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = JsonLines(
            path,
            "the events journal",
            "events are still sent, but those not yet delivered would be lost if this process were killed",
        )

    def read(self) -> tuple[str, int, list[WireEvent]] | None:
        """What an earlier process of the site left: its session, the last acknowledged number and the events
        after it; ``None`` when there is no journal (or nothing usable in it)."""
        entries = self._file.read(_parse)
        events: list[WireEvent] = []
        session, acked = "", 0
        for entry in entries or ():
            if isinstance(entry, WireEvent):
                events.append(entry)
                continue
            session = entry.get("session", session)
            del events[: entry["acked"] - acked]
            acked = entry["acked"]
        return (session, acked, events) if session else None

    def start(self, session: str, acked: int, pending: Iterable[WireEvent]) -> None:
        """Begin the file anew with ``session``, ``acked`` and the ``pending`` events."""
        self._file.start([{"session": session, "acked": acked}, *([event.name, event.data] for event in pending)])

    @property
    def grown(self) -> bool:
        return self._file.lines > COMPACT_AFTER_LINES

    def append(self, event: WireEvent) -> None:
        self._file.write([event.name, event.data])

    def acknowledged(self, seq: int) -> None:
        self._file.write({"acked": seq})

    def close(self, *, remove: bool = False) -> None:
        """Stop writing; with ``remove``, delete the file (everything in it was delivered)."""
        self._file.close(remove=remove)


def _parse(entry: Any) -> WireEvent | dict[str, Any]:
    """An event (``[name, data]``) or an acknowledgement (``{"acked": N}``, with the session in the first)."""
    if isinstance(entry, list):
        name, data = entry
        return WireEvent(str(name), dict(data))
    parsed: dict[str, Any] = {"acked": int(entry["acked"])}
    if "session" in entry:
        parsed["session"] = str(entry["session"])
    return parsed
