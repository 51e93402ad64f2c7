"""The server's end of the simulator: site hosts in worker processes, reached over pipes.

Each site lives on one worker (site ``i`` on worker ``i mod T``) for the whole job, so its executor keeps
its state between rounds. A worker runs one task at a time; the link keeps each worker's queue and hands it
the next task when the previous result arrives, which is when that task's deadlines start. A worker may
speak only for the sites it hosts: anything else it sends is refused.

A worker that dies fails the task it was running (naming its exit code), its sites leave, and it is started
again: its sites join again and the tasks queued behind it still run. A worker whose running task is given
up (timed out, left out) is stopped and started again the same way. Restarts use ``spawn``: forking a
process that runs threads can inherit locks held by them. A worker that exits before joining
:data:`MAX_FAILED_STARTS` times in a row (its job's code cannot be imported in a fresh process, say) is not
started again: its sites' tasks fail at once, naming why, and the workflow's rules decide.
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
from fedstream.messages import EventAck, EventBatch, Failure, Join, Result, Shutdown, Task
from fedstream.simulator import worker
from fedstream.wire import decode, encode

log = logging.getLogger(__name__)

MAX_FAILED_STARTS = 3
"""A worker that exits before joining this many times in a row is not started again: its sites' tasks fail."""


def start_method() -> str:
    """``fork`` on Linux, ``spawn`` elsewhere.

    Forked workers share the modules the server already imported (torch among them), so they start at once
    and use little memory of their own. The server forks them before it starts any thread of its own.
    """
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _prepare_to_fork() -> None:
    """Load what every worker would load on its own, and keep the garbage collector off inherited objects.

    Loaded once here (:func:`~fedstream.pt.executor.preload`), every forked worker shares it. ``gc.freeze``
    stops the workers' collections from touching (and so copying) the pages of the objects they inherit.
    """
    from fedstream.pt.executor import preload

    preload()

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
        self.ready = False  # the worker announced its sites: tasks go to it from then on
        self.dead = False
        self.retired = False  # replaced by a new incarnation: its exit is expected
        self.send_lock = threading.Lock()

    def send(self, frame: bytes) -> None:
        with self.send_lock:
            self.conn.send_bytes(frame)


class SimulatorLink:
    """A :class:`~fedstream.link.ServerLink` over worker processes; creating it starts them."""

    def __init__(self, specs: Sequence[worker.WorkerSpec]) -> None:
        if start_method() == "fork":
            _prepare_to_fork()
        self._lock = threading.Lock()
        self._endpoint: ServerEndpoint | None = None
        self._closing = False
        self._workers = [self._spawn(spec, start_method()) for spec in specs]
        self._placement = {site: w for w, spec in enumerate(specs) for site in spec.sites}
        self._readers: list[threading.Thread] = []
        self._failed_starts = [0] * len(specs)  # incarnations in a row that exited before joining
        self._broken: dict[int, str] = {}  # workers no longer started, and why

    # -- ServerLink ---------------------------------------------------------------------------------------------
    def start(self, endpoint: ServerEndpoint) -> None:
        self._endpoint = endpoint
        for handle in self._workers:
            self._read_from(handle)

    def send(self, task: Task) -> None:
        with self._lock:
            index = self._placement[task.site]
            if index in self._broken:
                self._fail(task, self._broken[index])
                return
            handle = self._workers[index]
            handle.queue.append(task)
            self._next(handle)

    def cancel(self, task_ids: set[str]) -> None:
        """Forget queued tasks; a worker running one of them is stopped and started again."""
        with self._lock:
            for handle in list(self._workers):
                handle.queue = deque(task for task in handle.queue if task.id not in task_ids)
                if handle.running is not None and handle.running.id in task_ids:
                    running = handle.running
                    self._restart(handle, f"{running.site}'s {running.kind} task was given up")

    def close(self, timeout_s: float = 60.0) -> None:
        """Ask every worker to deliver its remaining events and exit; stop any that do not within ``timeout_s``."""
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
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        for handle in self._workers:
            handle.process.join(max(0.0, deadline - time.monotonic()))  # also when the link never started
        for handle in self._workers:
            if handle.process.is_alive():
                log.warning("worker %d did not stop within %g s; stopping it", handle.index, timeout_s)
                self._kill(handle)

    def terminate(self) -> None:
        with self._lock:
            self._closing = True
        for handle in self._workers:
            self._kill(handle)

    # -- workers ------------------------------------------------------------------------------------------------
    @staticmethod
    def _spawn(spec: worker.WorkerSpec, method: str) -> _Worker:
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

    @staticmethod
    def _kill(handle: _Worker) -> None:
        handle.process.terminate()
        handle.process.join(5)
        if handle.process.is_alive():
            handle.process.kill()
            handle.process.join(5)

    def _restart(self, handle: _Worker, reason: str) -> None:
        """Under the lock: replace ``handle`` by a new incarnation that takes over its queue."""
        handle.retired = True
        self._kill(handle)
        self._left(handle, reason)
        fresh = self._spawn(handle.spec, "spawn")
        fresh.queue, handle.queue = handle.queue, deque()
        self._workers[handle.index] = fresh
        self._read_from(fresh)

    def _fail(self, task: Task, reason: str) -> None:
        assert self._endpoint is not None
        failure = Failure(task.site, task.kind, reason)
        self._endpoint.result_received(task.site, Result(task.id, task.site, failure=failure))

    def _left(self, handle: _Worker, reason: str) -> None:
        assert self._endpoint is not None
        log.warning("worker %d stopped (%s); its sites %s leave", handle.index, reason, ", ".join(sorted(handle.sites)))
        for site in sorted(handle.sites):
            self._endpoint.site_left(site, reason)

    def _next(self, handle: _Worker) -> None:
        """Under the lock: give an idle, ready worker its next task."""
        if handle.dead or not handle.ready or handle.running is not None or not handle.queue:
            return
        task = handle.queue.popleft()
        handle.running = task
        try:
            handle.send(encode(task))
        except OSError as exc:
            log.error("worker %d: cannot send a task: %s", handle.index, exc)
            return  # the reader sees the worker's end and fails its task
        assert self._endpoint is not None
        self._endpoint.task_started(task.id)

    # -- what the workers send ----------------------------------------------------------------------------------
    def _read_from(self, handle: _Worker) -> None:
        reader = threading.Thread(target=self._read, args=(handle,), name=f"worker-{handle.index}-reader", daemon=True)
        self._readers.append(reader)
        reader.start()

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
            if isinstance(message, Join):
                self._joined(handle, message)
            elif isinstance(message, Result):
                self._answered(handle, message)
            elif isinstance(message, EventBatch):
                if message.site not in handle.sites:
                    log.error(
                        "worker %d sent events for %r, which it does not host; refused", handle.index, message.site
                    )
                    continue
                seq = endpoint.events_received(message.site, message)
                try:
                    handle.send(encode(EventAck(message.site, message.session, seq)))
                except OSError:
                    break
            else:
                log.error("worker %d sent an unexpected %s; ignored", handle.index, type(message).__name__)
        self._exited(handle)

    def _joined(self, handle: _Worker, join: Join) -> None:
        assert self._endpoint is not None
        strangers = set(join.sites) - handle.sites
        if strangers:
            log.error(
                "worker %d announced sites it does not host (%s); ignored", handle.index, ", ".join(sorted(strangers))
            )
        for site in handle.spec.sites:
            if site in join.sites:
                self._endpoint.site_joined(site)
        with self._lock:
            handle.ready = True
            self._failed_starts[handle.index] = 0
            self._next(handle)

    def _answered(self, handle: _Worker, result: Result) -> None:
        assert self._endpoint is not None
        with self._lock:
            running = handle.running
            if running is None or running.id != result.task_id:
                log.error("worker %d answered task %s, which it was not running; refused", handle.index, result.task_id)
                return
            handle.running = None
            self._next(handle)
        self._endpoint.result_received(running.site, result)

    def _exited(self, handle: _Worker) -> None:
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
                self._fail(running, reason)
            if not handle.ready:
                self._failed_starts[handle.index] += 1
                if self._failed_starts[handle.index] == MAX_FAILED_STARTS:
                    self._broken[handle.index] = (
                        f"worker {handle.index} could not start, {MAX_FAILED_STARTS} times in a row (exit code "
                        f"{handle.process.exitcode}; its error is on the terminal and in log.txt)"
                    )
                    log.error("%s; its sites %s stay out", self._broken[handle.index], ", ".join(sorted(handle.sites)))
            if self._closing or handle.index in self._broken:
                for task in handle.queue:
                    self._fail(task, self._broken.get(handle.index, reason))
                handle.queue.clear()
                return
            self._restart(handle, f"worker exited with code {handle.process.exitcode}")
