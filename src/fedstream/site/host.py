"""Host one or more sites over a :class:`~fedstream.link.SiteLink`: take tasks, run them one at a time,
send results back, and deliver every site's events before stopping.

The simulator's worker processes are site hosts over a pipe; a deployed client is a site host over the
network. A host runs one task at a time, in the order the server sent them.

A deployed host (``keep_round_results``) keeps each site's results of its current round: a server resumed
after a restart sends the interrupted round's tasks again, under the same ids, and a task that comes again
is answered with the result the site has, so its training and what it logs are not repeated. A result's
weights are often views of the trainer's model, which the round's next task overwrites: before a site runs
another task of the same round, the arrays of its kept results are copied, into the copies of its earlier
round where they fit (a model's worth of memory on the site). A failure is not kept: a task that comes again
is tried again.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedstream.link import SiteLink
from fedstream.messages import EventAck, Failure, Result, Task
from fedstream.site.site import Site

log = logging.getLogger(__name__)


class SiteHost:
    """Serves ``sites`` (made on first use by ``make_site``) over ``link`` until the server shuts it down."""

    def __init__(
        self,
        link: SiteLink,
        sites: Sequence[str],
        make_site: Callable[[str], Site],
        *,
        keep_round_results: bool = False,
    ) -> None:
        self._link = link
        self._names = list(sites)
        self._make_site = make_site
        self._sites: dict[str, Site] = {}
        self._tasks: queue.Queue[Task | None] = queue.Queue()
        self._keep = keep_round_results
        self._kept: dict[str, _Kept] = {}
        self._room: dict[str, list[np.ndarray]] = {}  # site -> copies made for its earlier rounds, to copy into

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
        site = self._sites.get(task.site)
        if site is None:
            site = self._sites[task.site] = self._make_site(task.site)
        if not self._keep:
            return site.handle(task)
        kept = self._kept.get(task.site)
        if kept is not None and task.id in kept.results:
            log.info("%s: task %s came again (the server restarted); sending the result it has", task.site, task.id)
            return kept.results[task.id]
        room = self._room.setdefault(task.site, [])
        if kept is None or kept.round != task.round:  # the earlier round's copies become room for this round's
            room += kept.copies if kept is not None else []
            kept = self._kept[task.site] = _Kept(task.round)
        for done in kept.results.values():
            _own(done, room, kept.copies)
        result = site.handle(task)
        if result.failure is None:
            kept.results[task.id] = result
        return result


@dataclass
class _Kept:
    """A site's results of its current round, by task id, and the arrays copied for them (see the module)."""

    round: int
    results: dict[str, Result] = field(default_factory=dict)
    copies: list[np.ndarray] = field(default_factory=list)


def _own(result: Result, room: list[np.ndarray], copies: list[np.ndarray]) -> None:
    """Give ``result`` arrays of its own where it holds views of another array (the trainer's model), and add
    them to ``copies``: arrays of ``room`` of the same shape and type where there are (their memory is in use
    already, which makes the copy several times faster than into new memory), new arrays otherwise."""
    for arrays in (result.weights, *result.extra.values()):
        for name, array in arrays.items():
            if array.base is None:
                continue
            fits = next(
                (i for i, free in enumerate(room) if free.shape == array.shape and free.dtype == array.dtype), -1
            )
            if fits < 0:
                arrays[name] = array.copy()
            else:
                arrays[name] = room.pop(fits)
                np.copyto(arrays[name], array)
            copies.append(arrays[name])
