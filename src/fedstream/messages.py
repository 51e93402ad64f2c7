"""What travels between the server and the sites, and its byte encoding.

One vocabulary: a :class:`Task` goes server -> site, a :class:`Result` comes back, and :class:`EventBatch`
carries a site's events to the server, which answers with an :class:`EventAck`. Weights are named numpy
arrays. On the wire a message is a small JSON header followed by the weights in safetensors format, never a
pickle, so a site cannot make another process run code by sending it a message.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy

from fedstream.errors import TransportError

Weights = dict[str, np.ndarray]
"""A model's parameters by name, as numpy arrays (a torch ``state_dict`` converted without copying)."""

TRAIN = "train"
VALIDATE = "validate"


@dataclass(frozen=True)
class Task:
    """Work the server asks one site to do with the given global weights."""

    id: str
    site: str
    name: str
    round: int
    num_rounds: int
    weights: Weights = field(repr=False)


@dataclass(frozen=True)
class Result:
    """A site's answer to a task; ``error`` is non-empty when the site failed it."""

    task_id: str
    site: str
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    weights: Weights = field(default_factory=dict, repr=False)
    error: str = ""


@dataclass(frozen=True)
class EventBatch:
    """Consecutive events of one site, numbered from ``first_seq``; each event is ``(name, data)``.

    ``session`` names the sender's outbox: a site set up again (its worker restarted) numbers from 1 anew.
    """

    site: str
    first_seq: int
    events: list[tuple[str, Any]]
    session: str = ""


@dataclass(frozen=True)
class EventAck:
    """The server has handled every event of ``site`` up to and including ``seq``."""

    site: str
    seq: int


@dataclass(frozen=True)
class Ready:
    """The sender is set up and takes tasks for ``sites``."""

    sites: list[str]


@dataclass(frozen=True)
class Shutdown:
    """The server is done; the receiver should finish and exit."""

    reason: str = ""


Message = Task | Result | EventBatch | EventAck | Ready | Shutdown

_HEADER = struct.Struct("<I")


def encode(message: Message) -> bytes:
    """Encode ``message`` as a length-prefixed JSON header followed by safetensors-encoded weights."""
    weights: Weights = {}
    if isinstance(message, Task):
        header: dict[str, Any] = {
            "type": "task",
            "id": message.id,
            "site": message.site,
            "name": message.name,
            "round": message.round,
            "num_rounds": message.num_rounds,
        }
        weights = message.weights
    elif isinstance(message, Result):
        header = {
            "type": "result",
            "task_id": message.task_id,
            "site": message.site,
            "num_samples": message.num_samples,
            "metrics": message.metrics,
            "error": message.error,
        }
        weights = message.weights
    elif isinstance(message, EventBatch):
        header = {
            "type": "events",
            "site": message.site,
            "first_seq": message.first_seq,
            "events": message.events,
            "session": message.session,
        }
    elif isinstance(message, EventAck):
        header = {"type": "ack", "site": message.site, "seq": message.seq}
    elif isinstance(message, Ready):
        header = {"type": "ready", "sites": message.sites}
    elif isinstance(message, Shutdown):
        header = {"type": "shutdown", "reason": message.reason}
    else:
        raise TypeError(f"not a fedstream message: {type(message).__name__}")
    header["keys"] = list(weights)
    head = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    body = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in weights.items()}) if weights else b""
    return _HEADER.pack(len(head)) + head + body


def decode(frame: bytes) -> Message:
    """Decode a frame made by :func:`encode`; a malformed frame raises :class:`TransportError`."""
    try:
        (size,) = _HEADER.unpack_from(frame)
        header = json.loads(frame[_HEADER.size : _HEADER.size + size])
        body = frame[_HEADER.size + size :]
        loaded = safetensors.numpy.load(body) if body else {}
        weights = {key: loaded[key] for key in header["keys"]}
        kind = header["type"]
        if kind == "task":
            return Task(
                id=str(header["id"]),
                site=str(header["site"]),
                name=str(header["name"]),
                round=int(header["round"]),
                num_rounds=int(header["num_rounds"]),
                weights=weights,
            )
        if kind == "result":
            return Result(
                task_id=str(header["task_id"]),
                site=str(header["site"]),
                num_samples=int(header["num_samples"]),
                metrics={str(k): float(v) for k, v in header["metrics"].items()},
                weights=weights,
                error=str(header["error"]),
            )
        if kind == "events":
            events = [(str(name), data) for name, data in header["events"]]
            return EventBatch(
                site=str(header["site"]),
                first_seq=int(header["first_seq"]),
                events=events,
                session=str(header.get("session", "")),
            )
        if kind == "ack":
            return EventAck(site=str(header["site"]), seq=int(header["seq"]))
        if kind == "ready":
            return Ready(sites=[str(site) for site in header["sites"]])
        if kind == "shutdown":
            return Shutdown(reason=str(header["reason"]))
        raise TransportError(f"unknown message type {kind!r}")
    except TransportError:
        raise
    except Exception as exc:  # any malformation: bad JSON, missing key, bad safetensors
        raise TransportError(f"malformed message ({len(frame)} bytes): {exc}") from exc
