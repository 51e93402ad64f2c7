"""Host one or more sites over a :class:`~fedstream.link.SiteLink`: take tasks, run them one at a time,
send results back, and deliver every site's events before stopping.

The simulator's worker processes are site hosts over a pipe; a deployed client is a site host over the
network. A host runs one task at a time, in the order the server sent them. A task that comes again (a server
resumed after a restart sends the interrupted round's tasks again, under the same ids) is answered with the
result the site already has, so its training and what it logs are not repeated.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence

from fedstream.link import SiteLink
from fedstream.messages import EventAck, Failure, Result, Task
from fedstream.site.site import Site

log = logging.getLogger(__name__)


class SiteHost:
    """Serves ``sites`` (made on first use by ``make_site``) over ``link`` until the server shuts it down."""

    def __init__(self, link: SiteLink, sites: Sequence[str], make_site: Callable[[str], Site]) -> None:
        self._link = link
        self._names = list(sites)
        self._make_site = make_site
        self._sites: dict[str, Site] = {}
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self._answered: dict[str, Result] = {}  # each site's last result, kept until its next other task

    # -- SiteEndpoint ---------------------------------------------------------------------------------------
    def task_received(self, task: Task) -> None:
        self._tasks.put(task)

    def events_acknowledged(self, ack: EventAck) -> None:
        site = self._sites.get(ack.site)
        if site is not None and site.outbox.session == ack.session:
            site.outbox.acknowledge(ack.seq)

    def shutdown(self, reason: str) -> None:
        self._tasks.put(None)

    # -- running ------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Announce the sites, run tasks until the server is done, then deliver what is left and stop."""
        self._link.start(self, self._names)
        while (task := self._tasks.get()) is not None:
            self._link.send_result(self._run(task))
        for name, site in self._sites.items():
            lost = site.close()
            if lost:
                log.error("%s: %d events could not be delivered to the server", name, lost)
        self._link.close()

    def _run(self, task: Task) -> Result:
        if task.site not in self._names:
            reason = f"this host does not run {task.site!r}"
            return Result(task.id, task.site, failure=Failure(task.site, task.kind, reason))
        last = self._answered.pop(task.site, None)
        if last is not None and last.task_id == task.id:
            log.info(
                "%s: task %s came again (the server restarted); sending the result it already has", task.site, task.id
            )
            self._answered[task.site] = last
            return last
        site = self._sites.get(task.site)
        if site is None:
            site = self._sites[task.site] = self._make_site(task.site)
        result = site.handle(task)
        if result.failure is None:  # a failure is not kept: a task that comes again is tried again
            self._answered[task.site] = result
        return result
