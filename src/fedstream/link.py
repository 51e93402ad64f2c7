"""The small interface between the server and its sites, whatever carries the bytes.

The simulator's pipes to its worker processes implement it today; a network link implements the same
interface. Neither the server workflow nor the site's trainer knows which one they run on.

Server side: the runtime calls :meth:`ServerLink.send` and :meth:`ServerLink.cancel`; the link calls back
into a :class:`ServerEndpoint` when a task actually starts, when a result arrives and when a batch of events
arrives. The link, not the payload, says which site a message came from.

Site side: the site calls :meth:`SiteLink.send_result` and :meth:`SiteLink.send_events`; tasks and
acknowledgements come back to it through the callbacks it registered.
"""

from __future__ import annotations

from typing import Protocol

from fedstream.messages import EventBatch, Result, Task


class ServerEndpoint(Protocol):
    """What a link delivers to on the server."""

    def task_started(self, task_id: str) -> None:
        """The task left the server for its site: its timeout starts now."""

    def result_received(self, site: str, result: Result) -> None:
        """``site`` (as authenticated by the link) answered a task."""

    def events_received(self, site: str, batch: EventBatch) -> int:
        """Handle ``site``'s events; returns the highest sequence number handled, to acknowledge."""


class ServerLink(Protocol):
    """The server's end of the connections to all sites."""

    def send(self, task: Task) -> None:
        """Queue ``task`` for ``task.site``; call ``task_started`` when it is actually on its way."""

    def cancel(self, task_ids: set[str]) -> None:
        """Forget tasks that have not left yet; results of the others will be ignored by the caller."""

    def close(self) -> None:
        """Tell every site to finish and release the connections."""


class SiteLink(Protocol):
    """A site's end of its connection to the server."""

    def send_result(self, result: Result) -> None:
        """Send the answer to a task."""

    def send_events(self, batch: EventBatch) -> None:
        """Send a batch of events; the acknowledgement arrives later through the site's callback."""
