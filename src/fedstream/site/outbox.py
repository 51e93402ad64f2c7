"""Ship a site's events to the server exactly once and in order, without making the caller wait.

The :class:`Forwarder` subscribes to the configured event names on the site's bus and puts each event,
renamed with the configured prefix, into the :class:`Outbox`. The outbox numbers events, sends them in
batches (when a batch is full, when the oldest event has waited ``max_delay_s``, or when asked to flush),
keeps each batch until the server acknowledges it, and resends it if no acknowledgement arrives within
``ack_timeout_s``. The server skips numbers it has already handled, so a resend never duplicates.

Memory is bounded by backpressure: when ``capacity`` events wait (the server is behind), :meth:`Outbox.put`
waits for room, which slows the code that logs. Nothing is dropped on the site. With a ``journal`` (deployed
sites) the events are also written to disk as they are put, and a new outbox of the site resends, in the same
session, what an earlier process killed before delivering had left (:mod:`fedstream.site.journal`).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from fedstream.errors import FedstreamError
from fedstream.events import EventBus, Forwardable
from fedstream.messages import EventBatch, WireEvent
from fedstream.site.journal import Journal

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 4 * 1024**2
"""A batch closes at 1000 events or at about this many bytes (texts of up to 1 MB each may be logged)."""


class Outbox:
    """A site's outgoing events: numbered, batched, acknowledged, resent."""

    def __init__(
        self,
        site: str,
        send: Callable[[EventBatch], None],
        *,
        batch_size: int = 1000,
        max_delay_s: float = 0.5,
        ack_timeout_s: float = 10.0,
        capacity: int = 100_000,
        journal: Path | None = None,
    ) -> None:
        self.site = site
        self.session = secrets.token_hex(4)
        self._send = send
        self._batch_size = batch_size
        self._max_delay_s = max_delay_s
        self._ack_timeout_s = ack_timeout_s
        self._capacity = capacity
        self._cond = threading.Condition()
        self._pending: deque[WireEvent] = deque()
        self._oldest = 0.0  # when the first pending event was put
        self._inflight: EventBatch | None = None
        self._sent_at = 0.0
        self._acked = 0  # every event up to this sequence number is handled by the server
        self._acked_at = time.monotonic()  # when the server last acknowledged something
        self._flushing = False
        self._closed = False
        self.resends = 0
        self._thread: threading.Thread | None = None  # started by the first event: sites that never log have none
        self._journal = Journal(journal) if journal is not None else None
        if self._journal is not None:
            self._resume(self._journal)

    def _resume(self, journal: Journal) -> None:
        """Take over what an earlier process of this site left undelivered, and start the journal anew."""
        left = journal.read()
        if left is not None:
            self.session, self._acked, events = left
            if events:
                log.info(
                    "%s: resending %d events that an earlier process of the site had not delivered",
                    self.site,
                    len(events),
                )
                self._pending.extend(events)
                self._oldest = time.monotonic()
                self._start_sending()
        journal.start(self.session, self._acked, self._pending)

    def _start_sending(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"outbox-{self.site}", daemon=True)
        self._thread.start()

    def put(self, event: WireEvent) -> None:
        """Queue one event; waits only while ``capacity`` events are already waiting for the server."""
        with self._cond:
            if self._closed:
                raise FedstreamError(
                    f"{self.site} has finished: an event logged after its last task ({event.name}) cannot be "
                    "delivered; log from the trainer's own calls, or join its threads before train() returns"
                )
            if self._thread is None:
                self._start_sending()
            if len(self._pending) >= self._capacity:
                log.info("%s: %d events wait for the server; the caller waits for room", self.site, self._capacity)
                self._cond.wait_for(lambda: len(self._pending) < self._capacity or self._closed)
            if not self._pending:
                self._oldest = time.monotonic()
                self._cond.notify_all()  # the sender sleeps while nothing waits: start its max_delay_s clock
            self._pending.append(event)
            if self._journal is not None:
                self._journal.append(event)
            if len(self._pending) == self._batch_size:
                self._cond.notify_all()

    def acknowledge(self, seq: int) -> None:
        """The server has handled every event up to ``seq``."""
        with self._cond:
            batch = self._inflight
            if batch is None or seq < batch.first_seq:
                return
            done = seq - batch.first_seq + 1
            self._acked = seq
            self._acked_at = time.monotonic()
            if self._journal is not None:
                self._journal.acknowledged(seq)
            if done >= len(batch.events):
                self._inflight = None
            else:  # partly handled: resend the rest
                self._inflight = EventBatch(self.site, self.session, seq + 1, batch.events[done:])
                self._sent_at = 0.0
            if self._journal is not None and self._inflight is None and self._journal.grown:
                self._journal.start(self.session, self._acked, self._pending)  # only what is not delivered
            self._cond.notify_all()

    def flush(self, stall_timeout_s: float) -> bool:
        """Send everything queued so far and wait until the server acknowledged it.

        Waits as long as the server keeps acknowledging; gives up (``False``) after ``stall_timeout_s`` seconds
        without any acknowledgement.
        """
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            self._acked_at = time.monotonic()
            while self._pending or self._inflight is not None:
                stalled = time.monotonic() - self._acked_at
                if stalled >= stall_timeout_s:
                    return False
                self._cond.wait(stall_timeout_s - stalled)
            return True

    @property
    def unacknowledged(self) -> int:
        """Events put but not yet acknowledged by the server."""
        with self._cond:
            return len(self._pending) + (len(self._inflight.events) if self._inflight else 0)

    def close(self, stall_timeout_s: float) -> int:
        """Flush, then stop the sending thread; returns how many events were never acknowledged (given up)."""
        self.flush(stall_timeout_s)
        with self._cond:
            self._closed = True
            lost = len(self._pending) + (len(self._inflight.events) if self._inflight else 0)
            if self._journal is not None:  # kept for a next process of the site while anything is undelivered
                self._journal.close(remove=not lost)
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return lost

    def _next_batch(self) -> EventBatch | None:
        """Under the lock: the batch to send now, or ``None`` after waiting a while."""
        now = time.monotonic()
        if self._inflight is not None:
            wait = self._sent_at + self._ack_timeout_s - now
            if wait <= 0:
                if self._sent_at:
                    self.resends += 1
                    log.warning(
                        "%s: no acknowledgement for events from #%d; resending",
                        self.site,
                        self._inflight.first_seq,
                    )
                return self._inflight
            self._cond.wait(wait)
            return None
        if not self._pending:
            self._flushing = False
            self._cond.wait()
            return None
        wait = self._oldest + self._max_delay_s - now
        if len(self._pending) < self._batch_size and not self._flushing and wait > 0:
            self._cond.wait(wait)
            return None
        events: list[WireEvent] = []
        size = 0
        while self._pending and len(events) < self._batch_size and (not events or size < MAX_BATCH_BYTES):
            events.append(self._pending.popleft())
            size += _size(events[-1])
        self._oldest = now
        self._inflight = EventBatch(self.site, self.session, self._acked + 1, events)
        return self._inflight

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                batch = self._next_batch()
                if batch is not None:
                    self._sent_at = time.monotonic()
                    self._cond.notify_all()  # a blocked put() may proceed
            if batch is not None:
                try:
                    self._send(batch)
                except Exception:
                    log.exception("%s: sending events failed; will resend", self.site)


def _size(event: WireEvent) -> int:
    """About how many bytes ``event`` takes on the wire: its text values dominate, numbers are small."""
    return 64 + sum(len(value) for value in event.data.values() if isinstance(value, str))


class Forwarder:
    """Ships the site's events named in ``events`` to the server as ``prefix + name``."""

    def __init__(self, bus: EventBus, outbox: Outbox, events: Sequence[str], prefix: str) -> None:
        for name in events:
            bus.subscribe(name, self._forward_as(prefix + name, outbox))

    @staticmethod
    def _forward_as(fed_name: str, outbox: Outbox) -> Callable[[Forwardable], None]:
        def forward(event: Forwardable) -> None:
            outbox.put(WireEvent(fed_name, event.to_wire()))

        return forward
