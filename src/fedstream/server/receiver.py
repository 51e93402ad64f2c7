"""The base of server components that write events somewhere (MLflow, TensorBoard): it owns the queue, the
writing thread and the accounting, so that a receiver only opens, writes and closes.

Life of a receiver, driven by the server runtime:

1. :meth:`Receiver.start` calls :meth:`Receiver.open` (which raises if the backend is unusable, so that the
   job fails before training) and starts the receiver's thread;
2. :meth:`Receiver.handle` queues each subscribed event and returns: a slow backend never holds up the
   sites' acknowledgements, until ``max_pending`` events wait. Then ``handle`` waits for room while the
   backend works (backpressure: the sites slow down), and drops new events (counted, with the reason) only
   while the backend is unavailable;
3. the thread hands queued events to :meth:`Receiver.write` in batches (up to ``batch_size``, or what came
   within ``flush_interval_s``). ``write`` writes them, counts any the backend refuses with
   :meth:`Receiver.refuse`, and raises :class:`BackendUnavailable` with the events it could not write, which
   are retried with a growing pause;
4. :meth:`Receiver.stop` writes what is left until its deadline, calls :meth:`Receiver.close`, and counts
   whatever could not be written by then as dropped. The deadline holds even if the backend hangs.

Counts are of events: a site's tracking record is one event, a round's global metrics another.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedstream.events import Event

log = logging.getLogger(__name__)

MAX_REASONS = 20


@dataclass(frozen=True)
class JobInfo:
    """What a receiver knows about the job when it starts."""

    name: str
    id: str
    description: str
    sites: tuple[str, ...]
    workspace: Path  # the server's own folder
    config: dict[str, Any]  # the resolved job config


@dataclass(frozen=True)
class JobOutcome:
    """How the job ended, given to receivers when they stop."""

    status: str  # "completed", "failed" or "interrupted"
    error: str
    models: dict[str, Path] = field(default_factory=dict)


@dataclass
class ReceiverReport:
    """Counts a receiver reports in ``result.json``; ``errors`` non-empty means events were lost or refused."""

    received: int = 0
    written: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class BackendUnavailable(Exception):
    """Raised by :meth:`Receiver.write`: the backend does not answer; ``pending`` (a part of the events, in
    order) were not written and will be retried."""

    def __init__(self, reason: str, pending: Sequence[Event]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.pending = list(pending)


class Receiver(ABC):
    """Subscribes to the event names in :attr:`events` and writes them on its own thread (see the module).

    Args:
        events: the event names to write.
        batch_size: at most this many events per :meth:`write`.
        flush_interval_s: how long events may wait for a fuller batch.
        max_pending: events held (queued and being retried) before :meth:`handle` waits or drops.
        stop_timeout_s: at the end, how long to keep writing what is left.
    """

    def __init__(
        self,
        *,
        events: Sequence[str],
        batch_size: int,
        flush_interval_s: float,
        max_pending: int,
        stop_timeout_s: float,
    ) -> None:
        for name, value in (("flush_interval_s", flush_interval_s), ("batch_size", batch_size)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if not stop_timeout_s >= 0:
            raise ValueError(f"stop_timeout_s must be 0 or more, got {stop_timeout_s}")
        self.events = list(events)
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.stop_timeout_s = stop_timeout_s
        self._report = ReceiverReport()
        self._cond = threading.Condition()
        self._queue: deque[Event] = deque()
        self._oldest = 0.0
        self._inflight = 0
        self._unavailable = ""  # why the backend is not answering, while it is not
        self._stopping = False
        self._closed = False
        self._give_up_at = float("inf")
        self._thread: threading.Thread | None = None
        self._outcome: JobOutcome | None = None

    # -- what a receiver implements -------------------------------------------------------------------------
    @abstractmethod
    def open(self, job: JobInfo) -> None:
        """Connect, create runs, open files; raise if the backend cannot be used."""

    @abstractmethod
    def write(self, events: Sequence[Event]) -> None:
        """Write ``events``; :meth:`refuse` those the backend refuses; raise :class:`BackendUnavailable` with
        the ones not written when the backend does not answer."""

    def close(self, outcome: JobOutcome) -> None:  # noqa: B027 - optional hook
        """Finish (close runs and files); everything written is already written."""

    # -- helpers for receivers ------------------------------------------------------------------------------
    def refuse(self, count: int, reason: str) -> None:
        """Count ``count`` events of the current :meth:`write` as refused by the backend (not written)."""
        self._dropped(count, reason)
        self._refused_now += count

    def note(self, error: str) -> None:
        """Report a problem that cost no event (a run that could not be closed, say)."""
        with self._cond:
            if error not in self._report.errors and len(self._report.errors) < MAX_REASONS:
                self._report.errors.append(error)

    @property
    def details(self) -> dict[str, Any]:
        """Receiver-specific facts for ``result.json`` (URIs, run ids, folders)."""
        return self._report.details

    # -- driven by the runtime ------------------------------------------------------------------------------
    def start(self, job: JobInfo) -> None:
        """Open the backend (raising if it is unusable) and start writing."""
        self.open(job)
        self._thread = threading.Thread(target=self._run, name=f"{type(self).__name__}-writer", daemon=True)
        self._thread.start()

    def handle(self, event: Event) -> None:
        """Queue ``event`` (see the module for when this waits or drops)."""
        with self._cond:
            self._report.received += 1
            while len(self._queue) + self._inflight >= self.max_pending:
                if self._unavailable or self._stopping or self._thread is None:
                    why = self._unavailable or "the receiver is not running"
                    self._dropped_locked(1, f"{self.max_pending} events waited ({why}); later ones were dropped")
                    return
                self._cond.wait()
            if not self._queue:
                self._oldest = time.monotonic()
                self._cond.notify_all()  # the writer sleeps while nothing waits: start its flush_interval_s clock
            self._queue.append(event)
            if len(self._queue) == self.batch_size:
                self._cond.notify_all()

    def stop(self, outcome: JobOutcome, timeout_s: float | None = None) -> None:
        """Write what is left (for at most ``timeout_s``, default ``stop_timeout_s``), then close."""
        deadline = time.monotonic() + (self.stop_timeout_s if timeout_s is None else timeout_s)
        with self._cond:
            self._outcome = outcome
            self._stopping = True
            self._give_up_at = min(self._give_up_at, deadline)
            self._cond.notify_all()
        while self._thread is not None and self._thread.is_alive():
            with self._cond:
                give_up_at = self._give_up_at
            if time.monotonic() > give_up_at + 1.0:  # the thread is stuck in a backend call: leave it
                break
            self._thread.join(0.1)  # in slices, so that hurry() from a signal handler takes effect
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                left = len(self._queue) + self._inflight
                why = self._unavailable or "the backend is slow"
                self._dropped_locked(left, f"{left} events not confirmed written by the deadline ({why})")
                self._queue.clear()
                self._inflight = 0
                self._report.errors.append(
                    f"{type(self).__name__} did not finish by its deadline; runs or files may be left open"
                )
            self._closed = True

    def hurry(self) -> None:
        """Stop writing now (a second interrupt): what is left is counted as dropped."""
        with self._cond:
            self._give_up_at = time.monotonic()
            self._cond.notify_all()

    def report(self) -> ReceiverReport:
        """What was received, written and dropped, and why."""
        with self._cond:
            return ReceiverReport(
                self._report.received,
                self._report.written,
                self._report.dropped,
                list(self._report.errors),
                dict(self._report.details),
            )

    # -- the writing thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        pause = 0.0
        while True:
            batch = self._take(time.monotonic() + pause)
            if batch is None:
                break
            self._refused_now = 0
            try:
                self.write(batch)
                pending: list[Event] = []
                reason = ""
            except BackendUnavailable as down:
                pending, reason = down.pending, down.reason
            except Exception as exc:  # a receiver's own failure (a full disk, say): retried like an outage
                log.exception("%s failed to write", type(self).__name__)
                pending, reason = batch, f"{type(exc).__name__}: {exc}"
            with self._cond:
                self._inflight = 0
                self._report.written += len(batch) - len(pending) - self._refused_now
                self._queue.extendleft(reversed(pending))
                if pending and reason != self._unavailable:
                    log.warning("%s: %s; holding %d events, retrying", type(self).__name__, reason, len(self._queue))
                elif not pending and self._unavailable:
                    log.info("%s: the backend is back; the held events are being written", type(self).__name__)
                self._unavailable = reason if pending else ""
                pause = min(max(pause * 2, self.flush_interval_s), 30.0) if pending else 0.0
                self._cond.notify_all()
        outcome = self._outcome or JobOutcome("failed", "stopped")
        try:
            self.close(outcome)
        except Exception as exc:
            log.exception("%s failed to close", type(self).__name__)
            self.note(f"could not close: {type(exc).__name__}: {exc}")

    def _take(self, not_before: float) -> list[Event] | None:
        """The next batch to write (not before ``not_before``: a pause after a failure), or ``None`` when
        stopping and nothing is left, or at the deadline."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._stopping and now >= self._give_up_at:
                    if self._queue:
                        left = len(self._queue)
                        self._dropped_locked(
                            left,
                            f"{left} events could not be written before the end ({self._unavailable or 'out of time'})",
                        )
                        self._queue.clear()
                    return None
                if self._stopping and not self._queue:
                    return None
                ready_at = self._oldest + self.flush_interval_s
                if self._stopping or len(self._queue) >= self.batch_size:
                    ready_at = now
                ready_at = max(ready_at, not_before)
                if self._queue and now >= ready_at:
                    count = min(self.batch_size, len(self._queue))
                    batch = [self._queue.popleft() for _ in range(count)]
                    self._inflight = count
                    self._oldest = now
                    self._cond.notify_all()  # a waiting handle() may proceed
                    return batch
                timeout = min(ready_at, self._give_up_at) - now if self._queue else None
                if self._stopping and timeout is None:
                    timeout = max(0.0, self._give_up_at - now)
                self._cond.wait(timeout)

    def _dropped(self, count: int, reason: str) -> None:
        with self._cond:
            self._dropped_locked(count, reason)

    def _dropped_locked(self, count: int, reason: str) -> None:
        self._report.dropped += count
        if reason and reason not in self._report.errors and len(self._report.errors) < MAX_REASONS:
            self._report.errors.append(reason)
            log.error("%s: %s", type(self).__name__, reason)
