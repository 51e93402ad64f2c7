"""What a receiver is: a server component that writes events somewhere (MLflow, TensorBoard).

A receiver only opens its backend, writes batches of events and closes. Everything else is the
:class:`~fedstream.server.receiver_host.ReceiverHost`'s: the queue, the batching, the retries while the
backend is unavailable, backpressure, the accounting of what was written and dropped, deadlines, and the
process the receiver runs in.

A receiver runs in a process of its own, so it is pickled on its way there: keep its attributes plain data
until :meth:`Receiver.open`, which runs in that process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedstream.events import Event


@dataclass(frozen=True)
class JobInfo:
    """What a receiver knows about the job when it opens."""

    name: str
    id: str
    description: str
    sites: tuple[str, ...]
    workspace: Path  # the server's own folder
    config: dict[str, Any]  # the resolved job config


@dataclass(frozen=True)
class JobOutcome:
    """How the job ended, given to receivers when they close."""

    status: str  # "completed", "failed" or "interrupted"
    error: str
    models: dict[str, Path] = field(default_factory=dict)


@dataclass
class ReceiverReport:
    """Counts a receiver reports in ``result.json``; ``errors`` non-empty means events were lost or refused.

    Counts are of events: a site's tracking record is one event, a round's global metrics another.
    """

    received: int = 0
    written: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class BackendUnavailable(Exception):
    """Raised by :meth:`Receiver.write`: the backend does not answer; ``pending`` (some of the events, in
    order) were not written and will be written again later."""

    def __init__(self, reason: str, pending: Sequence[Event]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.pending = list(pending)


class Receiver(ABC):
    """Writes the events named in :attr:`events`.

    Args:
        events: the event names to write.
        batch_size: at most this many events per :meth:`write`.
        flush_interval_s: how long events may wait for a fuller batch.
        max_pending: events held (waiting and being retried) before the sites are slowed down, or, while the
            backend is unavailable, before new events are dropped.
        stop_timeout_s: at the end, how long to keep writing what is left; it holds even if the backend hangs.
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
        self.details: dict[str, Any] = {}
        """Facts for ``result.json`` (URIs, run ids, folders), set by the receiver."""
        self.refused = 0
        self.problems: list[str] = []

    def check(self, job: JobInfo) -> None:  # noqa: B027 - optional hook
        """A quick check, in the server's process before training starts, that the backend can be used; raise
        :class:`~fedstream.errors.TrackingError` naming the problem if not. Opening (which may take seconds)
        happens while the sites start training."""

    @abstractmethod
    def open(self, job: JobInfo) -> None:
        """Connect, create runs, open files; raise if the backend cannot be used (the job is then stopped)."""

    @abstractmethod
    def write(self, events: Sequence[Event]) -> None:
        """Write ``events``: :meth:`refuse` those the backend refuses, raise :class:`BackendUnavailable` with
        those not written when the backend does not answer."""

    def close(self, outcome: JobOutcome) -> None:  # noqa: B027 - optional hook
        """Finish (close runs and files); everything written is already written."""

    def refuse(self, count: int, reason: str) -> None:
        """Count ``count`` events of the current :meth:`write` as refused by the backend (so not written)."""
        self.refused += count
        if reason:
            self.problems.append(reason)

    def note(self, problem: str) -> None:
        """Report a problem that cost no event (a run that could not be closed, say)."""
        self.problems.append(problem)
