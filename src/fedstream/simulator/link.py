"""The server's end of the simulator: worker processes reached over pipes.

Each site lives on one worker (site ``i`` on worker ``i mod T``) for the whole job, so its trainer keeps
its state between rounds. A worker runs one task at a time; the link keeps each worker's queue and hands it
the next task when the previous result arrives, which is when that task's deadlines start. A worker is
trusted to speak only for the sites it hosts: anything else it sends is rejected.

A worker that dies fails the task it was running (naming its exit code) and is started again; a worker
whose running task is given up (timed out, left out) is stopped and started again, so that the sites queued
behind it get their turn. A restarted worker sets its sites up anew. Restarts are started with ``spawn``:
forking a process that runs threads can inherit locks held by them.
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
from fedstream.messages import EventAck, EventBatch, Ready, Result, Shutdown, Task, decode, encode
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
    """One incarnation of worker ``spec.index``: its process, its pipe, its queue."""

    def __init__(self, spec: worker.WorkerSpec, process: BaseProcess, conn: Connection) -> None:
        self.spec = spec
        self.index = spec.index
        self.process = process
        self.conn = conn
        self.sites = set(spec.sites)
        self.queue: deque[Task] = deque()
        self.running: Task | None = None
        self.ready = False  # the worker said it is set up: tasks go to it from then on
        self.dead = False
        self.retired = False  # replaced by a new incarnation: its exit is expected
        self.send_lock = threading.Lock()
        self.reader: threading.Thread | None = None

    def send(self, frame: bytes) -> None:
        with self.send_lock:
            self.conn.send_bytes(frame)


class SimulatorLink:
    """A :class:`~fedstream.link.ServerLink` over worker processes."""

    def __init__(self, specs: Sequence[worker.WorkerSpec]) -> None:
        if start_method() == "fork":
            _prepare_to_fork()
        self._lock = threading.Lock()
        self._endpoint: ServerEndpoint | None = None
        self._closing = False
        self._workers = [self._start(spec, start_method()) for spec in specs]
        self._placement = {site: w for w, spec in enumerate(specs) for site in spec.sites}
        self.restarts: list[dict[str, object]] = []

    @staticmethod
    def _start(spec: worker.WorkerSpec, method: str) -> _Worker:
        context = multiprocessing.get_context(method)
        ours, theirs = context.Pipe()
        process = context.Process(  # type: ignore[attr-defined]
            target=worker.main,
            args=(spec.to_json(), theirs),
            name=f"fedstream-worker-{spec.index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        return _Worker(spec, process, ours)

    def connect(self, endpoint: ServerEndpoint) -> None:
        """Start delivering what the workers send to ``endpoint``."""
        self._endpoint = endpoint
        for handle in self._workers:
            self._start_reader(handle)

    def _start_reader(self, handle: _Worker) -> None:
        handle.reader = threading.Thread(
            target=self._read, args=(handle,), name=f"worker-{handle.index}-reader", daemon=True
        )
        handle.reader.start()

    # -- ServerLink ------------------------------------------------------------------------------------
    def send(self, task: Task) -> None:
        with self._lock:
            handle = self._workers[self._placement[task.site]]
            handle.queue.append(task)
            self._next(handle)

    def cancel(self, task_ids: set[str]) -> None:
        """Forget queued tasks; a worker running one of them is stopped and started again."""
        with self._lock:
            for handle in list(self._workers):
                handle.queue = deque(task for task in handle.queue if task.id not in task_ids)
                if handle.running is not None and handle.running.id in task_ids:
                    self._restart(handle, f"{handle.running.site}'s {handle.running.name} task was given up")

    def close(self, timeout_s: float = 60.0) -> None:
        """Ask every worker to deliver its remaining events and exit; stop any that do not within ``timeout_s``.

        Each worker's reader thread delivers what the worker still sends, then reaps it when its pipe closes.
        """
        with self._lock:
            self._closing = True
        for handle in self._workers:
            with contextlib.suppress(OSError):  # an already dead worker is reaped below
                handle.send(encode(Shutdown("job finished")))
        deadline = time.monotonic() + timeout_s
        for handle in self._workers:
            if handle.running is not None:
                log.warning("worker %d still runs %s's task; stopping it", handle.index, handle.running.site)
                self._kill(handle)
            if handle.reader is not None:
                handle.reader.join(max(0.0, deadline - time.monotonic()))
            if handle.process.is_alive():
                log.warning("worker %d did not stop within %g s; terminating it", handle.index, timeout_s)
                self._kill(handle)

    def terminate(self) -> None:
        """Stop all workers now (Ctrl-C)."""
        with self._lock:
            self._closing = True
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
    def _restart(self, handle: _Worker, reason: str) -> None:
        """Under the lock: replace ``handle`` by a new incarnation that takes over its queue."""
        handle.retired = True
        self._kill(handle)
        sites = sorted(handle.sites, key=handle.spec.sites.__getitem__)
        log.warning("worker %d restarts (%s); its sites %s set up again", handle.index, reason, ", ".join(sites))
        self.restarts.append({"worker": handle.index, "sites": sites, "reason": reason})
        fresh = self._start(handle.spec, "spawn")
        fresh.queue = handle.queue
        handle.queue = deque()
        self._workers[handle.index] = fresh
        self._start_reader(fresh)
        self._next(fresh)

    def _next(self, handle: _Worker) -> None:
        """Under the lock: give an idle worker its next task."""
        if handle.dead or not handle.ready:
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
            if isinstance(message, Ready):
                with self._lock:
                    handle.ready = True
                    self._next(handle)
            elif isinstance(message, Result):
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
            self._next(handle)
        self._endpoint.result_received(running.site, result)

    def _on_exit(self, handle: _Worker) -> None:
        """The worker's pipe closed: fail the task it was running; restart it unless the job is ending."""
        handle.process.join(5)
        assert self._endpoint is not None
        with self._lock:
            handle.dead = True
            if handle.retired:
                return
            running, handle.running = handle.running, None
            reason = f"its worker process exited unexpectedly (exit code {handle.process.exitcode})"
            if running is not None:
                self._endpoint.result_received(running.site, Result(running.id, running.site, error=reason))
            if self._closing:
                for task in handle.queue:
                    self._endpoint.result_received(task.site, Result(task.id, task.site, error=reason))
                handle.queue.clear()
                return
            self._restart(handle, f"worker exited with code {handle.process.exitcode}")
