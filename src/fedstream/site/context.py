"""Who and where a site is, and how code running for it finds that out.

While a site handles a task its :class:`SiteContext` is the *current site* (a context variable), so tracking
writers created anywhere in the site's code attach to the right site without any setup.
"""

from __future__ import annotations

import logging
import threading
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from pathlib import Path

from fedstream.errors import FedstreamError
from fedstream.events import Event, EventBus


@dataclass(frozen=True, eq=False)
class SiteContext:
    """A site's identity and runtime services.

    Attributes:
        name: the site's name (``site-1``).
        index: its position among the job's sites, from 0; used to pick its share of a data set.
        num_sites: how many sites the job has.
        job_name: the job's name.
        job_id: the job's unique id.
        workspace: the site's own folder for logs and files.
        bus: the site's event bus; tracking writers fire ``analytics`` events on it (see :meth:`emit`).
        log: the site's logger (its records go to the site's own log file).
        auto_steps: per metric key, the step the next call without a step will use.
    """

    name: str
    index: int
    num_sites: int
    job_name: str
    job_id: str
    workspace: Path
    bus: EventBus
    log: logging.Logger
    auto_steps: dict[str, int] = field(default_factory=dict)
    _closed: threading.Event = field(default_factory=threading.Event, repr=False)

    def emit(self, event: Event) -> None:
        """Fire ``event`` on the site's bus; refused once the site has finished (nothing would deliver it)."""
        if self._closed.is_set():
            raise FedstreamError(
                f"{self.name} has finished: {event.name} events after its last task cannot be delivered "
                "(a thread of the site's code still logging? join it before the task returns)"
            )
        self.bus.fire(event)

    def close(self) -> None:
        """The site has finished: later :meth:`emit` calls raise."""
        self._closed.set()


_current: ContextVar[SiteContext | None] = ContextVar("fedstream_site", default=None)


def current_site() -> SiteContext:
    """The site whose task is running on this thread; raises outside of a site's task."""
    site = _current.get()
    if site is None:
        raise FedstreamError(
            "no fedstream site is running here: tracking writers work inside a trainer's setup(), train() "
            "and validate() (or code they call)"
        )
    return site


def current_site_or_none() -> SiteContext | None:
    """The current site, or ``None`` outside of a site's task (used to route log records)."""
    return _current.get()


def run_as(site: SiteContext) -> Token[SiteContext | None]:
    """Make ``site`` current on this thread; pass the returned token to :func:`restore`."""
    return _current.set(site)


def restore(token: Token[SiteContext | None]) -> None:
    """Undo :func:`run_as`."""
    _current.reset(token)
