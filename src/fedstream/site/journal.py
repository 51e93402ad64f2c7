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

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from fedstream.messages import WireEvent

log = logging.getLogger(__name__)

COMPACT_AFTER_LINES = 10_000


class Journal:
    """The journal file of one site's outbox at ``path``; a write that fails turns it off (with one error in
    the log): the events still travel, only their copy on disk is missing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._lines = 0

    def read(self) -> tuple[str, int, list[WireEvent]] | None:
        """What an earlier process of the site left: its session, the last acknowledged number and the events
        after it; ``None`` when there is no journal (or nothing usable in it)."""
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read the events journal %s (%s); events it holds are not resent", self.path, exc)
            return None
        events: list[WireEvent] = []
        session, acked = "", 0
        for number, line in enumerate(lines):
            try:
                entry = json.loads(line)
                if isinstance(entry, list):
                    name, data = entry
                    events.append(WireEvent(str(name), dict(data)))
                    continue
                session = str(entry.get("session", session))
                new_acked = int(entry["acked"])
            except (ValueError, TypeError, KeyError, AttributeError):  # a line cut short by a full disk, or edited
                log.warning(
                    "%s: line %d is not an event or acknowledgement; it and what follows are ignored",
                    self.path,
                    number + 1,
                )
                break
            del events[: new_acked - acked]
            acked = new_acked
        return (session, acked, events) if session else None

    def start(self, session: str, acked: int, pending: Iterable[WireEvent]) -> None:
        """Begin the file anew with ``session``, ``acked`` and the ``pending`` events (written to a new file
        that replaces the old one at once, so that a kill meanwhile leaves one or the other whole)."""
        self.close()
        lines = [_line({"session": session, "acked": acked}), *(_event_line(event) for event in pending)]
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(b"".join(lines))
            partial.replace(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            self._broken(exc)
        self._lines = len(lines)

    @property
    def grown(self) -> bool:
        return self._lines > COMPACT_AFTER_LINES

    def append(self, event: WireEvent) -> None:
        self._write(_event_line(event))

    def acknowledged(self, seq: int) -> None:
        self._write(_line({"acked": seq}))

    def close(self, *, remove: bool = False) -> None:
        """Stop writing; with ``remove``, delete the file (everything in it was delivered)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove:
            self.path.unlink(missing_ok=True)

    def _write(self, line: bytes) -> None:
        if self._fd < 0:
            return
        try:
            if os.write(self._fd, line) != len(line):
                raise OSError("the disk is full")
            self._lines += 1
        except OSError as exc:
            self._broken(exc)

    def _broken(self, exc: OSError) -> None:
        log.error(
            "cannot write the events journal %s (%s): events are still sent, but those not yet delivered would "
            "be lost if this process were killed",
            self.path,
            exc,
        )
        self.close()


def _line(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=True).encode() + b"\n"


def _event_line(event: WireEvent) -> bytes:
    return _line([event.name, event.data])
