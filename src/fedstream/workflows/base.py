"""What a server workflow is, and the per-round summary every workflow reports."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedstream.messages import Weights
from fedstream.server.federation import Federation


@dataclass(frozen=True)
class RoundStarted:
    """Data of the ``round_started`` event."""

    round: int
    num_rounds: int


@dataclass(frozen=True)
class RoundSummary:
    """Data of the ``round_completed`` event and one entry of ``result.json``'s ``rounds``."""

    round: int
    duration_s: float
    clients: list[str]  # the sites whose training results went into the new global model
    num_samples: int  # training samples behind the new global model
    metrics: dict[str, float]  # the new global model's validation metrics, weighted by validation samples
    failed: dict[str, str] = field(default_factory=dict)  # site -> why it was left out


class Workflow(ABC):
    """Drives the sites through rounds; one instance per job, on the server."""

    def check(self, sites: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~fedstream.errors.ConfigError` (key = argument name) if it cannot run with ``sites``."""

    @abstractmethod
    def run(self, federation: Federation, weights: Weights) -> None:
        """Run the job from the initial ``weights``; raise :class:`~fedstream.errors.JobFailed` on failure."""
