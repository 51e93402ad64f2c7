"""Run a :class:`~fedstream.server.receiver.Receiver` in a process of its own and feed it events.

Why a process: a receiver's backend library (MLflow's SQLAlchemy, a TensorBoard writer) is CPU-heavy
Python; in its own process it neither competes for the server's interpreter lock nor can hang or crash the
server, and a deadline can always be kept by stopping the process.

Life of a receiver, driven by the server runtime:

1. :meth:`ReceiverHost.start` runs the receiver's quick :meth:`~fedstream.server.receiver.Receiver.check`
   here (an error fails the job before training), then starts the process, which opens the receiver while
   the sites start training, and a thread here that feeds it. Events wait until it is open; if opening
   fails, the host calls ``on_failure`` (the runtime stops the job) and drops what comes;
2. :meth:`ReceiverHost.handle` queues each subscribed event and returns: a slow backend does not hold up
   the sites' acknowledgements until ``max_pending`` events wait. Then ``handle`` waits for room while the
   backend works (backpressure: the sites slow down), and drops new events (counted, with the reason) only
   while the backend is unavailable;
3. the thread sends queued events to the process in batches (up to ``batch_size``, or what came within
   ``flush_interval_s``); events the backend did not take are kept and sent again after a growing pause;
4. :meth:`ReceiverHost.stop` writes what is left until the deadline, closes the receiver, and counts what
   could not be written as dropped; at the deadline the process is stopped whatever it is doing.

On a deployed server, forwarded events carry their position in the server's events journal, and the host
reports (``on_written``) how far it has written: every event it was given before that position.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from fedstream import logs
from fedstream.children import detach_from_terminal_signals
from fedstream.errors import TrackingError
from fedstream.events import Event
from fedstream.server.receiver import BackendUnavailable, JobInfo, JobOutcome, Receiver, ReceiverReport

log = logging.getLogger(__name__)

MAX_REASONS = 20
OPEN_TIMEOUT_S = 300.0


class ReceiverHost:
    """Feeds ``receiver`` (called ``name`` in the job) with events; see the module."""

    def __init__(self, name: str, receiver: Receiver) -> None:
        self.name = name
        self.receiver = receiver
        self.events = list(receiver.events)
        self._report = ReceiverReport()
        self._cond = threading.Condition()
        self._queue: deque[Event] = deque()
        self._oldest = 0.0
        self._inflight = 0
        self._unavailable = ""  # why the backend is not answering, while it is not
        self._dead = False  # the receiver's process stopped: nothing more can be written
        self._stopping = False
        self._give_up_at = float("inf")
        self._outcome = JobOutcome("failed", "stopped")
        self._thread: threading.Thread | None = None
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._on_written: Callable[[int], None] | None = None
        self._oldest_position: int | None = None  # of the oldest journaled event given and not yet written
        self._last_position = 0  # of the last journaled event given
        self._written_below = 0  # what on_written last heard

    # -- driven by the runtime ----------------------------------------------------------------------------
    def start(
        self, job: JobInfo, on_failure: Callable[[str], None], on_written: Callable[[int], None] | None = None
    ) -> None:
        """Check the backend (raising :class:`TrackingError`), then start opening and feeding the receiver in
        its process; ``on_failure`` hears if opening fails, ``on_written`` how far it has written (see the
        module)."""
        self._on_written = on_written
        self.receiver.check(job)
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(theirs, str(job.workspace.parent)), name=f"fedstream-{self.name}", daemon=True
        )
        self._process.start()
        theirs.close()
        self._conn = ours
        ours.send((self.receiver, job))
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-feeder", daemon=True)
        self._thread.start()

    def handle(self, event: Event) -> None:
        """Queue ``event`` (see the module for when this waits or drops)."""
        with self._cond:
            self._report.received += 1
            if self._dead:
                self._drop(1, f"{self.name} stopped ({self._unavailable}); later events were dropped")
                return
            while len(self._queue) + self._inflight >= self.receiver.max_pending:
                if self._unavailable or self._stopping or self._dead:
                    why = self._unavailable or "the receiver is stopping"
                    self._drop(1, f"{self.receiver.max_pending} events waited ({why}); later ones were dropped")
                    return
                self._cond.notify_all()  # the feeder writes a full queue at once
                self._cond.wait()
            if not self._queue:
                self._oldest = time.monotonic()
                self._cond.notify_all()  # the feeder sleeps while nothing waits: start its flush clock
            self._queue.append(event)
            position = getattr(event, "position", 0)
            if position:
                self._last_position = position
                if self._oldest_position is None:
                    self._oldest_position = position
            if len(self._queue) == self.receiver.batch_size:
                self._cond.notify_all()

    def stop(self, outcome: JobOutcome) -> None:
        """Write what is left (for at most the receiver's ``stop_timeout_s``), then close it."""
        with self._cond:
            self._outcome = outcome
            self._stopping = True
            self._give_up_at = min(self._give_up_at, time.monotonic() + self.receiver.stop_timeout_s)
            self._cond.notify_all()
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.1)  # in slices, so that hurry() from a signal handler takes effect
        if self._process is not None:
            self._process.join(5)  # it exits after closing
        self._kill()

    def hurry(self) -> None:
        """Stop writing now (a second interrupt): what is left is counted as dropped."""
        with self._cond:
            self._give_up_at = time.monotonic()
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Events received and not yet written (waiting, or on their way to the receiver's process)."""
        with self._cond:
            return len(self._queue) + self._inflight

    @property
    def oldest_unwritten(self) -> int | None:
        """The journal position of the oldest event given and not yet written; ``None`` when there is none."""
        with self._cond:
            return self._oldest_position

    @property
    def unavailable(self) -> str:
        """Why the backend does not take events now; empty while it does."""
        with self._cond:
            return self._unavailable

    def report(self) -> ReceiverReport:
        """What was received, written and dropped, and why."""
        with self._cond:
            report = self._report
            return ReceiverReport(
                report.received, report.written, report.dropped, list(report.errors), dict(report.details)
            )

    # -- the feeding thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        """Wait until the receiver is open, then feed it (see :meth:`_feed`) and close it."""
        opened = self._reply(time.monotonic() + OPEN_TIMEOUT_S)
        if opened is None or opened[0] == "failed":
            why = opened[1] if opened is not None else "its process exited or hung while opening"
            self._lost(0, f"could not open: {why}")
            self._kill()
            self._on_failure(f"receiver {self.name}: {why}")
            return
        with self._cond:
            self._absorb(opened[1])
        closed = self._call(("close", self._outcome)) if self._feed() else None
        if closed is None:
            self._note(f"{self.name} did not close by its deadline; its runs or files may be left open")
        else:
            with self._cond:
                self._absorb(closed[1])

    def _feed(self) -> bool:
        """Feed the process, keeping a second batch on its way while it writes one (none while the backend is
        unavailable); a batch's events that were not written go back to the front of the queue, in order.
        ``False`` if the process stopped or the deadline passed."""
        sent: deque[list[Event]] = deque()
        held: list[Event] = []  # not written: requeued once no batch is on its way, so that order is kept
        pause_until = 0.0
        pause = 0.0
        while True:
            while len(sent) < (1 if self._unavailable else 2):
                batch = self._take(pause_until, wait=not sent)
                if batch is None:
                    break
                if not self._send(("write", batch)):
                    sent.append(batch)
                    break
                sent.append(batch)
            if not sent:
                break
            batch = sent.popleft()
            reply = self._reply(None)
            if reply is None:
                self._lost(sum(map(len, sent)) + len(batch) + len(held), self._why_no_reply())
                self._kill()
                return False
            _, refused, pending, reason, news = reply
            with self._cond:
                self._absorb(news)
                self._inflight -= len(batch)
                self._report.written += len(batch) - len(pending) - refused
                self._report.dropped += refused
                held += [batch[i] for i in pending]
                if not sent and held:
                    self._queue.extendleft(reversed(held))
                    held = []
                if pending and reason != self._unavailable:
                    log.warning("%s: %s; holding %d events, retrying", self.name, reason, len(self._queue))
                elif not pending and self._unavailable:
                    log.info("%s: the backend is back; the held events are being written", self.name)
                self._unavailable = reason if pending else ""
                pause = min(max(pause * 2, self.receiver.flush_interval_s), 30.0) if pending else 0.0
                pause_until = time.monotonic() + pause
                below = self._written_progress(held, sent)
                self._cond.notify_all()
            if self._on_written is not None and below != self._written_below:
                self._written_below = below
                self._on_written(below)
        return True

    def _written_progress(self, held: list[Event], sent: deque[list[Event]]) -> int:
        """Under the lock: every journaled event given before the returned position is written (0: nothing
        journaled was given, or nobody listens)."""
        if self._on_written is None or not self._last_position:
            return 0
        self._oldest_position = _first_position((held, *sent, self._queue))
        return self._last_position + 1 if self._oldest_position is None else self._oldest_position

    def _take(self, not_before: float, *, wait: bool) -> list[Event] | None:
        """The next batch (not before ``not_before``: a pause after a failure); ``None`` when stopping and
        nothing is left, at the deadline (what is left is then dropped), or, unless ``wait``, when no batch is
        ready now."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._stopping and now >= self._give_up_at:
                    if self._queue:
                        why = self._unavailable or "out of time"
                        self._drop(
                            len(self._queue), f"{len(self._queue)} events could not be written by the end ({why})"
                        )
                        self._queue.clear()
                    return None
                if self._stopping and not self._queue:
                    return None
                ready_at = self._oldest + self.receiver.flush_interval_s
                full = len(self._queue) + self._inflight >= self.receiver.max_pending  # a sender waits for room
                if self._stopping or full or len(self._queue) >= self.receiver.batch_size:
                    ready_at = now
                ready_at = max(ready_at, not_before)
                if self._queue and now >= ready_at:
                    count = min(self.receiver.batch_size, len(self._queue))
                    batch = [self._queue.popleft() for _ in range(count)]
                    self._inflight += count
                    self._oldest = now
                    self._cond.notify_all()  # a waiting handle() may proceed
                    return batch
                if not wait:
                    return None
                wake = min(ready_at, self._give_up_at) if self._queue else self._give_up_at
                self._cond.wait(None if wake == float("inf") else max(0.0, wake - now))

    # -- the process ------------------------------------------------------------------------------------------
    def _call(self, message: tuple[str, Any]) -> tuple[Any, ...] | None:
        """Send ``message`` and wait for the answer until the deadline; ``None`` if none came (the process is
        then stopped)."""
        reply = self._reply(None) if self._send(message) else None
        if reply is None:
            self._kill()
        return reply

    def _why_no_reply(self) -> str:
        assert self._process is not None
        if self._process.is_alive():
            return f"the deadline passed while the backend was {self._unavailable or 'still writing'}"
        return f"its process exited (code {self._process.exitcode})"

    def _send(self, message: tuple[str, Any]) -> bool:
        assert self._conn is not None
        try:
            self._conn.send(message)
        except OSError:
            return False
        return True

    def _reply(self, deadline: float | None) -> tuple[Any, ...] | None:
        assert self._conn is not None and self._process is not None
        while True:
            with self._cond:
                limit = self._give_up_at if deadline is None else min(deadline, self._give_up_at)
            if time.monotonic() >= limit or (not self._process.is_alive() and not self._conn.poll()):
                return None
            try:
                if self._conn.poll(0.1):
                    reply: tuple[Any, ...] = self._conn.recv()
                    return reply
            except (EOFError, OSError):
                return None

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)

    # -- accounting ------------------------------------------------------------------------------------------
    def _absorb(self, news: dict[str, Any]) -> None:
        """Take the problems and details the receiver reported from its process."""
        for problem in news["problems"]:
            self._note_locked(problem)
        self._report.details = news["details"]

    def _lost(self, sent: int, why: str) -> None:
        """The process stopped: what it was sent and what waits is lost."""
        with self._cond:
            count = sent + len(self._queue)
            self._queue.clear()
            self._inflight = 0
            self._dead = True
            self._unavailable = why
            self._drop(count, f"{count} events were not confirmed written ({why})")
            self._cond.notify_all()

    def _note(self, problem: str) -> None:
        with self._cond:
            self._note_locked(problem)

    def _note_locked(self, problem: str) -> None:
        if problem not in self._report.errors and len(self._report.errors) < MAX_REASONS:
            self._report.errors.append(problem)
            log.error("%s: %s", self.name, problem)

    def _drop(self, count: int, reason: str) -> None:
        """Under the lock: count ``count`` events as dropped."""
        self._report.dropped += count
        self._note_locked(reason)


def _first_position(groups: Iterable[Iterable[Event]]) -> int | None:
    """The journal position of the first journaled event in ``groups``, in order."""
    for group in groups:
        for event in group:
            position: int = getattr(event, "position", 0)
            if position:
                return position
    return None


def _news(receiver: Receiver) -> dict[str, Any]:
    problems, receiver.problems = receiver.problems, []
    return {"problems": problems, "details": receiver.details}


def _serve(conn: Connection, workspace: str) -> None:
    """The receiver's process: open it, then write and close as the host asks."""
    detach_from_terminal_signals()
    logs.setup_receiver(Path(workspace))
    receiver, job = conn.recv()
    try:
        receiver.open(job)
    except Exception as exc:
        conn.send(("failed", str(exc) if isinstance(exc, TrackingError) else f"{type(exc).__name__}: {exc}"))
        return
    gc.freeze()  # the backend's modules and state stay: keep full collections off them
    conn.send(("opened", _news(receiver)))
    while True:
        kind, payload = conn.recv()
        if kind == "close":
            try:
                receiver.close(payload)
            except Exception as exc:
                log.exception("closing failed")
                receiver.note(f"could not close: {type(exc).__name__}: {exc}")
            conn.send(("closed", _news(receiver)))
            return
        receiver.refused = 0
        try:
            receiver.write(payload)
            pending: list[int] = []
            reason = ""
        except BackendUnavailable as down:
            where = {id(event): i for i, event in enumerate(payload)}
            pending, reason = [where[id(event)] for event in down.pending], down.reason
        except Exception as exc:  # the receiver's own failure (a full disk, say): retried like an outage
            log.exception("writing failed")
            pending, reason = list(range(len(payload))), f"{type(exc).__name__}: {exc}"
        conn.send(("wrote", receiver.refused, pending, reason, _news(receiver)))
