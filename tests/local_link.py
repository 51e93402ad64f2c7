"""A link whose site hosts run in threads of the test's own process: the federation, the workflow and the
site runtime meet as they do over any link, in milliseconds. Every message goes through the wire encoding."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from fedstream.config.schema import ForwardConfig
from fedstream.events import EventBus
from fedstream.link import ServerEndpoint, SiteEndpoint
from fedstream.messages import EventAck, EventBatch, Message, Result, Task
from fedstream.site.context import SiteContext
from fedstream.site.executor import Executor
from fedstream.site.host import SiteHost
from fedstream.site.site import Site
from fedstream.wire import decode, encode

M = TypeVar("M", bound=Message)


def over_the_wire(message: M) -> M:
    back = decode(encode(message))
    assert type(back) is type(message)
    return back  # type: ignore[return-value]


class _SiteSide:
    """A host's end: what the host sends goes straight to the server's endpoint."""

    def __init__(self, server: LocalLink) -> None:
        self.server = server
        self.endpoint: SiteEndpoint | None = None
        self.sites: list[str] = []

    def start(self, endpoint: SiteEndpoint, sites: Sequence[str]) -> None:
        self.endpoint, self.sites = endpoint, list(sites)
        for site in sites:
            self.server.endpoint().site_joined(site)
            with self.server.joined:
                self.server.hosts[site] = self
                self.server.joined.notify_all()

    def send_result(self, result: Result) -> None:
        self.server.endpoint().result_received(result.site, over_the_wire(result))

    def send_events(self, batch: EventBatch) -> None:
        seq = self.server.endpoint().events_received(batch.site, over_the_wire(batch))
        assert self.endpoint is not None
        self.endpoint.events_acknowledged(over_the_wire(EventAck(batch.site, batch.session, seq)))

    def close(self) -> None:
        pass


class LocalLink:
    """A ServerLink over site hosts in threads; ``groups`` says which sites share a host."""

    def __init__(self, groups: Sequence[Sequence[str]], make_executor: Callable[[str], Executor], folder: Path):
        self.groups = [list(group) for group in groups]
        self.make_executor = make_executor
        self.folder = folder
        self.hosts: dict[str, _SiteSide] = {}
        self.cancelled: set[str] = set()
        self._endpoint: ServerEndpoint | None = None
        self._threads: list[threading.Thread] = []
        self.joined = threading.Condition()
        self.num_sites = sum(map(len, groups))

    def endpoint(self) -> ServerEndpoint:
        assert self._endpoint is not None
        return self._endpoint

    def start(self, endpoint: ServerEndpoint) -> None:
        self._endpoint = endpoint
        index = iter(range(self.num_sites))
        for group in self.groups:
            side = _SiteSide(self)
            names = {name: next(index) for name in group}
            host = SiteHost(side, group, lambda name, names=names, side=side: self._site(name, names[name], side))
            thread = threading.Thread(target=host.serve, daemon=True)
            self._threads.append(thread)
            thread.start()
        with self.joined:
            assert self.joined.wait_for(lambda: len(self.hosts) == self.num_sites, 30), "the hosts did not start"

    def _site(self, name: str, index: int, side: _SiteSide) -> Site:
        context = SiteContext(
            name, index, self.num_sites, "job", "id", self.folder / name, EventBus(), logging.getLogger(name)
        )
        return Site(context, self.make_executor(name), side.send_events, ForwardConfig(), stall_timeout_s=5)

    def send(self, task: Task) -> None:
        side = self.hosts[task.site]
        assert side.endpoint is not None
        self.endpoint().task_started(task.id)
        side.endpoint.task_received(over_the_wire(task))

    def cancel(self, task_ids: set[str]) -> None:
        self.cancelled |= task_ids

    def close(self) -> None:
        for side in set(self.hosts.values()):
            assert side.endpoint is not None
            side.endpoint.shutdown("done")
        for thread in self._threads:
            thread.join(30)

    def terminate(self) -> None:
        self.close()
