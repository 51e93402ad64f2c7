"""What travels between the server and its sites: one frozen dataclass per message.

A :class:`Task` goes server -> site and a :class:`Result` comes back; a site's events travel in
:class:`EventBatch` messages that the server answers with an :class:`EventAck`. A site host announces the
sites it hosts with :class:`Join` and the server ends the conversation with :class:`Shutdown`. Their byte
encoding is in :mod:`fedstream.wire`.

Models travel as :data:`Weights` (named numpy arrays). A task or a result may carry more named groups of
arrays in ``extra`` (SCAFFOLD's control variates, the other sites' models of a cross-site evaluation), and
small JSON values in ``config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]
"""A model's parameters by name, as numpy arrays (a torch ``state_dict`` converted without copying)."""

TRAIN = "train"
VALIDATE = "validate"


@dataclass(frozen=True)
class Failure:
    """Why a site has no usable answer: the site, what it was doing (``train``, ``validate``, ``setup``...),
    and the reason in words a user can act on."""

    site: str
    phase: str
    reason: str

    def __str__(self) -> str:
        return f"{self.site} ({self.phase}): {self.reason}"


@dataclass(frozen=True)
class Payload:
    """What a task hands to a site besides its name: the model, named groups of extra arrays, and settings."""

    weights: Weights = field(default_factory=dict, repr=False)
    extra: dict[str, Weights] = field(default_factory=dict, repr=False)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """Work the server asks of one site: ``kind`` (``train``, ``validate``...) in ``round`` of ``num_rounds``."""

    id: str
    site: str
    kind: str
    round: int
    num_rounds: int
    payload: Payload = field(default_factory=Payload)


@dataclass(frozen=True)
class Result:
    """A site's answer to a task: what it computed, or the :class:`Failure` that stopped it."""

    task_id: str
    site: str
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    weights: Weights = field(default_factory=dict, repr=False)
    extra: dict[str, Weights] = field(default_factory=dict, repr=False)
    failure: Failure | None = None


@dataclass(frozen=True)
class WireEvent:
    """One forwarded event: its name on the server (``fed.analytics``) and its data as JSON values."""

    name: str
    data: dict[str, Any]


TASK_STARTED = "fedstream.task"
"""The event a deployed site puts into its event stream as it starts a task (data: ``{"task": <task id>}``). The
server's inbox takes it out of the stream; by it, the inbox tells the records of a task run again (the site's
process restarted in the middle of it) from those its first run logged."""


@dataclass(frozen=True)
class EventBatch:
    """Consecutive events of one site, numbered from ``first_seq`` within the sender's ``session``.

    A site set up anew (its worker restarted) starts a new session and numbers from 1 again.
    """

    site: str
    session: str
    first_seq: int
    events: list[WireEvent]


@dataclass(frozen=True)
class EventAck:
    """The server has handled every event of ``site``'s ``session`` up to and including ``seq``."""

    site: str
    session: str
    seq: int


@dataclass(frozen=True)
class Join:
    """The sender is set up and takes tasks for ``sites``."""

    sites: list[str]


@dataclass(frozen=True)
class Shutdown:
    """The server is done; the sites deliver their remaining events and stop."""

    reason: str = ""


Message = Task | Result | EventBatch | EventAck | Join | Shutdown
