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
        global _live
        self._closed.set()
        with _lock:
            _live = [site for site in _live if site is not self]


_current: ContextVar[SiteContext | None] = ContextVar("fedstream_site", default=None)
_lock = threading.Lock()
_live: list[SiteContext] = []  # the sites of this process that have not finished
_running: SiteContext | None = None  # the site whose task this process runs now


def current_site() -> SiteContext:
    """The site whose code is running.

    On the thread that runs a site's task it is that site. On any other thread (one the site's code started)
    it is the site whose task this process is running, or, between tasks, the process's only site. Raises
    when there is none, or when several sites share the process and none is running a task.
    """
    site = current_site_or_none()
    if site is not None:
        return site
    with _lock:
        many = len(_live)
    if many > 1:
        raise FedstreamError(
            f"no fedstream site is running here: {many} sites share this process and none is running a task, so "
            "a call from this thread belongs to none of them (log from threads while a task runs, or join them "
            "before it returns)"
        )
    raise FedstreamError(
        "no fedstream site is running here: tracking writers work inside a trainer's setup(), train() "
        "and validate() or a training script (and code and threads they start)"
    )


def current_site_or_none() -> SiteContext | None:
    """The current site (see :func:`current_site`), or ``None`` (used to route log records)."""
    site = _current.get()
    if site is not None:
        return site
    if _running is not None:
        return _running
    live = _live
    return live[0] if len(live) == 1 else None


def register(site: SiteContext) -> None:
    """``site`` lives in this process until :meth:`SiteContext.close`: threads without a site find it."""
    global _live
    with _lock:
        _live = [*_live, site]


def set_running(site: SiteContext | None) -> None:
    """``site`` runs a task in this process now (``None``: no site does)."""
    global _running
    _running = site


def run_as(site: SiteContext) -> Token[SiteContext | None]:
    """Make ``site`` current on this thread; pass the returned token to :func:`restore`."""
    return _current.set(site)


def restore(token: Token[SiteContext | None]) -> None:
    """Undo :func:`run_as`."""
    _current.reset(token)
