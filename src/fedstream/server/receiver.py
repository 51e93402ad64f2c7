"""The base of server components that subscribe to events and write them somewhere (MLflow, TensorBoard)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedstream.events import Event


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

    status: str  # "completed" or "failed"
    error: str
    models: dict[str, Path] = field(default_factory=dict)


@dataclass
class ReceiverReport:
    """Counts a receiver reports in ``result.json``; ``errors`` non-empty means records were lost or refused."""

    received: int = 0
    written: int = 0
    dropped: int = 0
    errors: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class Receiver(ABC):
    """Subscribes to the event names in :attr:`events`; started before training, stopped after it.

    ``start`` must fail (raise) when the receiver cannot do its job, so the job fails before training;
    ``handle`` runs on the thread that delivers events and must only queue work; ``stop`` writes what is
    left and closes; ``report`` says what was received, written and dropped.
    """

    events: list[str]

    def start(self, job: JobInfo) -> None:  # noqa: B027 - optional hook
        """Prepare to receive (connect, create runs, open files)."""

    @abstractmethod
    def handle(self, event: Event) -> None:
        """Take one event."""

    def stop(self, outcome: JobOutcome) -> None:  # noqa: B027 - optional hook
        """Write everything still buffered and release resources."""

    @abstractmethod
    def report(self) -> ReceiverReport:
        """What this receiver received, wrote and dropped."""
