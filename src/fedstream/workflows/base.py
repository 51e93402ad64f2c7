"""What a server workflow is, and the events every workflow fires about its rounds."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from fedstream.messages import Failure, Weights
from fedstream.server.federation import Federation
from fedstream.server.models import ModelStore


@dataclass(frozen=True)
class RoundStarted:
    """Round ``round`` of ``num_rounds`` begins."""

    name: ClassVar[str] = "round_started"
    round: int
    num_rounds: int


@dataclass(frozen=True)
class RoundSummary:
    """One round, as ``result.json``'s ``rounds`` records it.

    Attributes:
        round: the round, from 1.
        duration_s: how long it took.
        clients: the sites whose training results went into the new global model.
        num_samples: training samples behind the new global model.
        metrics: the new global model's validation metrics, weighted by validation samples.
        validated: the sites whose validation went into ``metrics``.
        failed: every site that failed a task of the round, with what it was doing and why.
        ended_at: wall-clock time (seconds since the epoch) when the round ended.
    """

    round: int
    duration_s: float
    clients: list[str]
    num_samples: int
    metrics: dict[str, float]
    validated: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    ended_at: float = 0.0


@dataclass(frozen=True)
class RoundCompleted:
    """A round ended with a new global model; ``position`` is its place in the deployed server's events
    journal (0: not journaled)."""

    name: ClassVar[str] = "round_completed"
    summary: RoundSummary
    position: int = 0


class Workflow(ABC):
    """Drives the sites through rounds; one instance per job, on the server."""

    def check(self, sites: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~fedstream.errors.ConfigError` (key = argument name) if it cannot run with ``sites``."""

    @abstractmethod
    def run(self, federation: Federation, models: ModelStore, weights: Weights) -> None:
        """Run the job from the initial ``weights``, saving global models in ``models`` and a checkpoint after
        each round; a job whose ``models`` hold a checkpoint (its server restarted) resumes after it. Raise
        :class:`~fedstream.errors.JobFailed` when the job cannot finish."""
