"""The server's end of the simulator: worker processes reached over pipes.

Each site lives on one worker (site ``i`` on worker ``i mod T``) for the whole job, so its trainer keeps
its state between rounds. A worker runs one task at a time; the link keeps each worker's queue and hands it
the next task when the previous result arrives, which is when that task's timeout starts. A worker is
trusted to speak only for the sites it hosts: anything else it sends is rejected. If a worker dies, its
tasks come back as failures naming its exit code.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from fedstream.errors import TransportError
from fedstream.link import ServerEndpoint
from fedstream.messages import EventAck, EventBatch, Result, Shutdown, Task, decode, encode
from fedstream.simulator import worker

log = logging.getLogger(__name__)


def start_method() -> str:
    """``fork`` on Linux, ``spawn`` elsewhere.

    Forked workers share the modules the server already imported (torch among them), so they start at once
    and use little memory of their own. The server forks them before it starts any thread of its own.
    """
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _prepare_to_fork() -> None:
    """Load what every worker would load on its own, and keep the garbage collector off inherited objects.

    PyTorch imports ``torch._dynamo`` (about 1 s and 70 MB) on an optimizer's first use; imported once here,
    every forked worker shares it. ``gc.freeze`` stops the workers' collections from touching (and so
    copying) the pages of the objects they inherit.
    """
    import torch._dynamo  # noqa: F401

    if threading.active_count() > 1:  # a forked child would inherit locks those threads may hold
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread())
        log.warning("forking workers while other threads run (%s); start them after the workers", names)
    gc.freeze()


class _Worker:
    def __init__(self, index: int, process: BaseProcess, conn: Connection, sites: set[str]) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.sites = sites
        self.queue: deque[Task] = deque()
        self.running: Task | None = None
        self.abandoned = False  # ``running`` was cancelled (timed out): the worker is stuck until it returns
        self.dead = False
        self.send_lock = threading.Lock()
        self.reader: threading.Thread | None = None

    def send(self, frame: bytes) -> None:
        with self.send_lock:
            self.conn.send_bytes(frame)


class SimulatorLink:
    """A :class:`~fedstream.link.ServerLink` over worker processes."""

    def __init__(self, specs: Sequence[worker.WorkerSpec]) -> None:
        context = multiprocessing.get_context(start_method())
        if start_method() == "fork":
            _prepare_to_fork()
        self._lock = threading.Lock()
        self._endpoint: ServerEndpoint | None = None
        self._workers: list[_Worker] = []
        self._placement: dict[str, _Worker] = {}
        for spec in specs:
            ours, theirs = context.Pipe()
            process = context.Process(  # type: ignore[attr-defined]
                target=worker.main,
                args=(spec.to_json(), theirs),
                name=f"fedstream-worker-{spec.index}",
                daemon=True,
            )
            process.start()
            theirs.close()
            handle = _Worker(spec.index, process, ours, set(spec.sites))
            self._workers.append(handle)
            for site in spec.sites:
                self._placement[site] = handle

    def connect(self, endpoint: ServerEndpoint) -> None:
        """Start delivering what the workers send to ``endpoint``."""
        self._endpoint = endpoint
        for handle in self._workers:
            handle.reader = threading.Thread(
                target=self._read, args=(handle,), name=f"worker-{handle.index}-reader", daemon=True
            )
            handle.reader.start()

    # -- ServerLink ------------------------------------------------------------------------------------
    def send(self, task: Task) -> None:
        handle = self._placement[task.site]
        with self._lock:
            handle.queue.append(task)
            self._next(handle)

    def cancel(self, task_ids: set[str]) -> None:
        with self._lock:
            for handle in self._workers:
                handle.queue = deque(task for task in handle.queue if task.id not in task_ids)
                if handle.running is not None and handle.running.id in task_ids:
                    handle.abandoned = True
                    self._next(handle)

    def close(self, timeout_s: float = 60.0) -> None:
        """Ask every worker to deliver its remaining events and exit; stop any that do not within ``timeout_s``.

        Each worker's reader thread delivers what the worker still sends, then reaps it when its pipe closes.
        """
        for handle in self._workers:
            with contextlib.suppress(OSError):  # an already dead worker is reaped below
                handle.send(encode(Shutdown("job finished")))
        deadline = time.monotonic() + timeout_s
        for handle in self._workers:
            if handle.abandoned:
                log.warning(
                    "worker %d still runs a task that timed out (%s); stopping it",
                    handle.index,
                    handle.running,
                )
                self._kill(handle)
            if handle.reader is not None:
                handle.reader.join(max(0.0, deadline - time.monotonic()))
            if handle.process.is_alive():
                log.warning("worker %d did not stop within %g s; terminating it", handle.index, timeout_s)
                self._kill(handle)

    def terminate(self) -> None:
        """Stop all workers now (Ctrl-C)."""
        for handle in self._workers:
            self._kill(handle)

    @staticmethod
    def _kill(handle: _Worker) -> None:
        handle.process.terminate()
        handle.process.join(5)
        if handle.process.is_alive():
            handle.process.kill()
            handle.process.join(5)

    # -- internals -------------------------------------------------------------------------------------
    def _next(self, handle: _Worker) -> None:
        """Under the lock: give an idle worker its next task (or fail it at once if the worker is gone)."""
        if handle.dead or handle.abandoned:
            self._fail(handle, list(handle.queue))
            handle.queue.clear()
            return
        if handle.running is not None or not handle.queue:
            return
        task = handle.queue.popleft()
        handle.running = task
        try:
            handle.send(encode(task))
        except OSError as exc:
            log.error("worker %d: cannot send a task: %s", handle.index, exc)
            return  # the reader sees the worker's end and fails its tasks
        assert self._endpoint is not None
        self._endpoint.task_started(task.id)

    def _read(self, handle: _Worker) -> None:
        assert self._endpoint is not None
        endpoint = self._endpoint
        while True:
            try:
                message = decode(handle.conn.recv_bytes())
            except (EOFError, OSError):
                break
            except TransportError as exc:
                log.error("worker %d sent a malformed message: %s", handle.index, exc)
                continue
            if isinstance(message, Result):
                self._on_result(handle, message)
            elif isinstance(message, EventBatch):
                if message.site not in handle.sites:
                    log.error(
                        "worker %d sent events for %r, which it does not host; dropped",
                        handle.index,
                        message.site,
                    )
                    continue
                seq = endpoint.events_received(message.site, message)
                try:
                    handle.send(encode(EventAck(message.site, seq)))
                except OSError:
                    break
        self._on_exit(handle)

    def _on_result(self, handle: _Worker, result: Result) -> None:
        assert self._endpoint is not None
        with self._lock:
            running = handle.running
            if running is None or running.id != result.task_id:
                log.error(
                    "worker %d answered task %s, which it was not running; dropped",
                    handle.index,
                    result.task_id,
                )
                return
            handle.running = None
            handle.abandoned = False
            self._next(handle)
        self._endpoint.result_received(running.site, result)

    def _on_exit(self, handle: _Worker) -> None:
        """The worker's pipe closed: fail whatever it was running or had queued, and anything sent later."""
        handle.process.join(5)
        with self._lock:
            handle.dead = True
            self._fail(handle, ([handle.running] if handle.running else []) + list(handle.queue))
            handle.running, handle.queue = None, deque()

    def _fail(self, handle: _Worker, tasks: list[Task]) -> None:
        """Under the lock: answer ``tasks`` with the reason their worker cannot run them."""
        assert self._endpoint is not None
        if handle.dead:
            reason = f"its worker process exited unexpectedly (exit code {handle.process.exitcode})"
        else:
            running = handle.running.site if handle.running else "another site"
            reason = f"its worker is still busy with a task of {running} that timed out"
        for task in tasks:
            self._endpoint.result_received(task.site, Result(task.id, task.site, error=reason))
