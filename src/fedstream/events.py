"""Named events and the in-process bus that delivers them to subscribers.

Every process has a bus: on a site, writers fire ``analytics`` events and the forwarder ships the configured
names to the server; on the server, events from sites arrive as ``fed.<name>`` next to the server's own
events (``round_completed``, ...) and receivers subscribe to the names they want.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# Events the server fires itself (``data`` is a Python object in the server process).
ROUND_STARTED = "round_started"
TASKS_SENT = "tasks_sent"
TASK_STARTED = "task_started"
TASK_DONE = "task_done"
ROUND_COMPLETED = "round_completed"
JOB_FINISHED = "job_finished"

# The event name tracking writers fire on a site.
ANALYTICS = "analytics"


@dataclass(frozen=True)
class Event:
    """Something that happened. ``site`` is the site it came from (stamped by the server from the link),
    or empty for an event of the process that fired it."""

    name: str
    data: Any
    site: str = ""


Handler = Callable[[Event], None]


class EventBus:
    """Synchronous publish/subscribe by event name.

    Handlers run on the firing thread and must be quick and thread-safe. A handler that raises does not stop
    the others; the failure is logged and kept in :attr:`errors` so the job can report it.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}
        self._lock = threading.Lock()
        self.errors: list[str] = []

    def subscribe(self, name: str, handler: Handler) -> None:
        """Call ``handler`` for every event called ``name``."""
        with self._lock:
            self._handlers = {**self._handlers, name: [*self._handlers.get(name, []), handler]}

    def fire(self, event: Event) -> None:
        """Deliver ``event`` to its subscribers, in subscription order."""
        for handler in self._handlers.get(event.name, ()):
            try:
                handler(event)
            except Exception as exc:
                message = f"handler {getattr(handler, '__qualname__', handler)!r} failed on {event.name!r}: {exc!r}"
                log.exception(message)
                with self._lock:
                    self.errors.append(message)
