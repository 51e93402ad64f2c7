"""An append-only file of JSON lines that a killed writer leaves whole: the two events journals' file.

Each value is one line written with one ``write`` call, so the operating system keeps it through a kill of
the process (a power cut is not covered: there is no fsync per line). A new start writes the file anew and
replaces the old one at once, so that a kill meanwhile leaves one or the other. A write that fails (a full
disk, a read-only folder) logs one error saying what that costs and turns the file off; the caller goes on
without it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

DAMAGED = (ValueError, TypeError, KeyError, AttributeError, IndexError)
"""What parsing a damaged line raises (a line cut short by a full disk, or edited by hand)."""


class JsonLines:
    """The file at ``path``, called ``what`` in the log; ``cost`` completes the error logged when writing
    fails (what would be lost)."""

    def __init__(self, path: Path, what: str, cost: str) -> None:
        self.path = path
        self._what = what
        self._cost = cost
        self._fd = -1
        self.lines = 0

    def read(self, parse: Callable[[Any], T]) -> list[T] | None:
        """Each line parsed with ``parse``, up to the first line that is not JSON or that ``parse`` refuses
        (with a warning); ``None`` when there is no file (or it cannot be read: logged)."""
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read %s %s (%s); what it holds is not taken over", self._what, self.path, exc)
            return None
        values: list[T] = []
        for number, line in enumerate(lines):
            try:
                values.append(parse(json.loads(line)))
            except DAMAGED:
                log.warning("%s: line %d is damaged; it and what follows are ignored", self.path, number + 1)
                break
        return values

    def start(self, values: Iterable[object]) -> None:
        """Begin the file anew with ``values``, then keep it open for :meth:`write`."""
        self.close()
        lines = [line(value) for value in values]
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(b"".join(lines))
            partial.replace(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            self._broken(exc)
        self.lines = len(lines)

    def write(self, value: object) -> None:
        """Append ``value`` as one line (nothing once a write has failed)."""
        if self._fd < 0:
            return
        data = line(value)
        try:
            if os.write(self._fd, data) != len(data):
                raise OSError("the disk is full")
            self.lines += 1
        except OSError as exc:
            self._broken(exc)

    def close(self, *, remove: bool = False) -> None:
        """Stop writing; with ``remove``, delete the file (nothing in it is needed any more)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove:
            try:
                self.path.unlink()
            except (FileNotFoundError, NotADirectoryError):  # never written (or its folder is not one)
                pass
            except OSError as exc:
                log.warning("cannot remove %s %s (%s); nothing in it is needed any more", self._what, self.path, exc)

    def _broken(self, exc: OSError) -> None:
        log.error("cannot write %s %s (%s): %s", self._what, self.path, exc, self._cost)
        self.close()


def line(value: object) -> bytes:
    """``value`` as one line of compact JSON (NaN and infinities as JavaScript writes them, as MLflow takes)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=True).encode() + b"\n"
