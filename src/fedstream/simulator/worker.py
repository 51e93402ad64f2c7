"""A simulator worker process: hosts some of the job's sites and runs their tasks one at a time.

It speaks to the server only in :mod:`fedstream.messages` frames over its pipe. A reader thread takes
tasks and acknowledgements off the pipe; the main thread runs tasks. The worker ignores Ctrl-C (the server
decides when it stops) and dies with its parent.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from fedstream import logs
from fedstream.config import load_job_data
from fedstream.events import EventBus
from fedstream.messages import EventAck, EventBatch, Ready, Result, Shutdown, Task, decode, encode
from fedstream.site.context import SiteContext
from fedstream.site.runtime import Site

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, passed as JSON."""

    index: int
    job_dir: str
    job_source: str
    config: dict  # the resolved job config
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
    """The sites' side of the pipe to the server; several threads may send at once."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send_result(self, result: Result) -> None:
        self._send(encode(result))

    def send_events(self, batch: EventBatch) -> None:
        self._send(encode(batch))

    def _send(self, frame: bytes) -> None:
        with self._lock:
            self._conn.send_bytes(frame)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, so a killed server leaves no orphans."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(spec_json: str, conn: Connection) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    spec = WorkerSpec.from_json(spec_json)
    torch.set_num_threads(spec.torch_threads)
    logs.setup_worker(Path(spec.workspace), list(spec.sites), verbose=spec.verbose)
    job = load_job_data(Path(spec.job_dir), spec.config, [], source=spec.job_source)
    link = PipeSiteLink(conn)
    sites: dict[str, Site] = {}
    tasks: queue.Queue[Task | None] = queue.Queue()

    def site(name: str) -> Site:
        if name not in sites:
            folder = Path(spec.workspace) / name
            context = SiteContext(
                name=name,
                index=spec.sites[name],
                num_sites=spec.num_sites,
                job_name=job.name,
                job_id=spec.job_id,
                workspace=folder,
                bus=EventBus(),
                log=logging.getLogger(f"fedstream.site.{name}"),
            )
            sites[name] = Site(job, context, link)
        return sites[name]

    def read() -> None:
        while True:
            try:
                message = decode(conn.recv_bytes())
            except (EOFError, OSError):
                os._exit(3)  # the server is gone: nothing left to do for
            if isinstance(message, Task):
                tasks.put(message)
            elif isinstance(message, EventAck) and message.site in sites:
                sites[message.site].outbox.acknowledge(message.seq)
            elif isinstance(message, Shutdown):
                tasks.put(None)

    threading.Thread(target=read, name="pipe-reader", daemon=True).start()
    log.info("worker %d (pid %d) hosts %s", spec.index, os.getpid(), ", ".join(spec.sites))
    conn.send_bytes(encode(Ready(list(spec.sites))))
    while (task := tasks.get()) is not None:
        if task.site not in spec.sites:
            link.send_result(
                Result(task.id, task.site, error=f"site {task.site!r} is not hosted by worker {spec.index}")
            )
            continue
        link.send_result(site(task.site).handle(task))
    for hosted in sites.values():
        if not hosted.close():
            log.error("%s: %d events could not be delivered", hosted.context.name, hosted.outbox.unacknowledged)
    logging.shutdown()
