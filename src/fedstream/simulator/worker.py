"""A simulator worker process: a :class:`~fedstream.site.host.SiteHost` for some of the job's sites, over a pipe.

The worker ignores Ctrl-C (the server decides when it stops), dies with its parent, captures the sites'
prints into their logs, and speaks to the server only in :mod:`fedstream.wire` frames.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedstream import logs
from fedstream.children import detach_from_terminal_signals
from fedstream.config import load_job_data
from fedstream.errors import TransportError
from fedstream.link import SiteEndpoint
from fedstream.messages import EventAck, EventBatch, Join, Message, Result, Shutdown, Task
from fedstream.site.host import SiteHost
from fedstream.wire import decode, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, passed as JSON."""

    index: int
    job_dir: str
    job_source: str
    config: dict[str, Any]  # the resolved job config
    job_id: str
    sites: dict[str, int]  # site name -> its index in the job
    num_sites: int
    workspace: str
    torch_threads: int
    verbose: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> WorkerSpec:
        return WorkerSpec(**json.loads(text))


class PipeSiteLink:
    """A :class:`~fedstream.link.SiteLink` over the worker's pipe; several threads may send at once."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def start(self, endpoint: SiteEndpoint, sites: Sequence[str]) -> None:
        self._send(Join(list(sites)))
        threading.Thread(target=self._read, args=(endpoint,), name="pipe-reader", daemon=True).start()

    def send_result(self, result: Result) -> None:
        self._send(result)

    def send_events(self, batch: EventBatch) -> None:
        self._send(batch)

    def close(self) -> None:
        self._conn.close()

    def _send(self, message: Message) -> None:
        frame = encode(message)
        with self._lock:
            self._conn.send_bytes(frame)

    def _read(self, endpoint: SiteEndpoint) -> None:
        while True:
            try:
                message = decode(self._conn.recv_bytes())
            except (EOFError, OSError):
                os._exit(3)  # the server is gone: nothing left to do for
            except TransportError as exc:
                log.error("the server sent a malformed message: %s", exc)
                continue
            if isinstance(message, Task):
                endpoint.task_received(message)
            elif isinstance(message, EventAck):
                endpoint.events_acknowledged(message)
            elif isinstance(message, Shutdown):
                endpoint.shutdown(message.reason)


def main(spec_json: str, conn: Connection) -> None:
    """Entry point of a worker process."""
    detach_from_terminal_signals()
    spec = WorkerSpec.from_json(spec_json)
    try:
        import torch

        from fedstream.pt.executor import job_sites

        torch.set_num_threads(spec.torch_threads)
        logs.setup_worker(Path(spec.workspace), list(spec.sites), verbose=spec.verbose)
        job = load_job_data(Path(spec.job_dir), spec.config, [], source=spec.job_source)
    except Exception as exc:  # the link sees the exit before a join, and starts the worker again a few times
        if logging.getLogger().handlers:
            log.exception("worker %d cannot start", spec.index)
        said = f"fedstream: worker {spec.index} cannot start: {type(exc).__name__}: {exc}"
        print(said, file=sys.__stderr__, flush=True)
        os._exit(1)
    link = PipeSiteLink(conn)
    log.info("worker %d (pid %d) hosts %s", spec.index, os.getpid(), ", ".join(spec.sites))
    make_site = job_sites(job, spec.job_id, spec.sites, spec.num_sites, Path(spec.workspace), link.send_events)
    SiteHost(link, list(spec.sites), make_site).serve()
    logging.shutdown()
