"""The interface between the server runtime and the site hosts, whatever carries the bytes.

A transport implements two halves: a :class:`ServerLink` in the server's process and a :class:`SiteLink` in
every process that hosts sites. The simulator's pipes to its worker processes are one transport
(:mod:`fedstream.simulator`); a network transport implements the same two classes. Neither the workflow nor
a site's executor knows which one it runs on.

Server side, in order of a job's life:

1. the runtime calls :meth:`ServerLink.start` with its :class:`ServerEndpoint`;
2. the link calls ``site_joined`` for each site that a site host announced (a :class:`~fedstream.messages.Join`),
   again after a reconnect or a restart, and ``site_left`` when it loses one;
3. the runtime calls :meth:`ServerLink.send` for each task; the link calls ``task_started`` when the site
   begins it (its deadlines count from then), ``result_received`` with the answer, and ``events_received``
   for each batch of events, whose return value it acknowledges to the site;
4. the runtime calls :meth:`ServerLink.cancel` for tasks it gave up, and :meth:`ServerLink.close` at the end.

The link, not the payload, says which site a message came from: a site host may speak only for the sites
it announced.

Site side: the host calls :meth:`SiteLink.start` with its :class:`SiteEndpoint` and the sites it hosts; tasks,
acknowledgements and the end of the job arrive through the endpoint; results and event batches leave
through :meth:`SiteLink.send_result` and :meth:`SiteLink.send_events`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fedstream.messages import EventAck, EventBatch, Result, Task


class ServerEndpoint(Protocol):
    """What a server link delivers to (the federation)."""

    def site_joined(self, site: str) -> None:
        """``site`` is set up and takes tasks."""

    def site_left(self, site: str, reason: str) -> None:
        """``site`` is gone (its host exited or disconnected); tasks it was running have failed."""

    def task_started(self, task_id: str) -> None:
        """The task's site began it: its deadlines count from now."""

    def result_received(self, site: str, result: Result) -> None:
        """``site`` (as authenticated by the link) answered a task."""

    def events_received(self, site: str, batch: EventBatch) -> int:
        """Handle ``site``'s events; returns the last sequence number handled, to acknowledge."""


class ServerLink(Protocol):
    """The server's end of the connections to every site."""

    def start(self, endpoint: ServerEndpoint) -> None:
        """Start delivering to ``endpoint``."""

    def send(self, task: Task) -> None:
        """Deliver ``task`` to ``task.site``, queued behind its other tasks if need be."""

    def cancel(self, task_ids: set[str]) -> None:
        """Give up these tasks: forget those not started, stop those running (their results are ignored)."""

    def close(self) -> None:
        """Tell every site host to finish (deliver its events, stop) and release the connections."""

    def terminate(self) -> None:
        """Stop every site host now (an interrupted job)."""


class SiteEndpoint(Protocol):
    """What a site link delivers to (the site host)."""

    def task_received(self, task: Task) -> None:
        """The server asks for ``task``."""

    def events_acknowledged(self, ack: EventAck) -> None:
        """The server handled a site's events up to ``ack.seq``."""

    def shutdown(self, reason: str) -> None:
        """The server is done with these sites."""


class SiteLink(Protocol):
    """A site host's end of its connection to the server."""

    def start(self, endpoint: SiteEndpoint, sites: Sequence[str]) -> None:
        """Announce ``sites`` to the server and start delivering to ``endpoint``."""

    def send_result(self, result: Result) -> None:
        """Send the answer to a task."""

    def send_events(self, batch: EventBatch) -> None:
        """Send a batch of events; its acknowledgement arrives through the endpoint."""

    def close(self) -> None:
        """Release the connection."""
