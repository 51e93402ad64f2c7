"""The byte encoding of :mod:`fedstream.messages`: a JSON header by field name, then the arrays.

A frame is ``<4-byte header length><JSON header><safetensors body>``. The header names the message type and
holds every field but the arrays, by name; the body holds the arrays (``weights/<name>``,
``extra/<group>/<name>``) in safetensors format. Never a pickle, so a message cannot make the receiving
process run code. :func:`decode` checks every field's type and refuses frames over a size limit.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import safetensors.numpy

from fedstream.errors import TransportError
from fedstream.messages import (
    EventAck,
    EventBatch,
    Failure,
    Join,
    Message,
    Payload,
    Result,
    Shutdown,
    Task,
    Weights,
    WireEvent,
)

_LENGTH = struct.Struct("<I")
MAX_FRAME_BYTES = 4 * 1024**3  # frames carry whole models; the link may set a lower limit


def encode(message: Message) -> bytes:
    """``message`` as one frame."""
    arrays: dict[str, Weights] = {}
    header: dict[str, Any]
    if isinstance(message, Task):
        header = {
            "type": "task",
            "id": message.id,
            "site": message.site,
            "kind": message.kind,
            "round": message.round,
            "num_rounds": message.num_rounds,
            "config": message.payload.config,
        }
        arrays = {"weights": message.payload.weights, **_extra(message.payload.extra)}
    elif isinstance(message, Result):
        failure = message.failure
        header = {
            "type": "result",
            "task_id": message.task_id,
            "site": message.site,
            "num_samples": message.num_samples,
            "metrics": message.metrics,
            "failure": None
            if failure is None
            else {"site": failure.site, "phase": failure.phase, "reason": failure.reason},
        }
        arrays = {"weights": message.weights, **_extra(message.extra)}
    elif isinstance(message, EventBatch):
        header = {
            "type": "events",
            "site": message.site,
            "session": message.session,
            "first_seq": message.first_seq,
            "events": [{"name": event.name, "data": event.data} for event in message.events],
        }
    elif isinstance(message, EventAck):
        header = {"type": "ack", "site": message.site, "session": message.session, "seq": message.seq}
    elif isinstance(message, Join):
        header = {"type": "join", "sites": message.sites}
    elif isinstance(message, Shutdown):
        header = {"type": "shutdown", "reason": message.reason}
    else:
        raise TypeError(f"not a fedstream message: {type(message).__name__}")
    flat = {f"{section}/{name}": array for section, group in arrays.items() for name, array in group.items()}
    header["arrays"] = {section: list(group) for section, group in arrays.items() if group}
    head = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    body = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in flat.items()}) if flat else b""
    return _LENGTH.pack(len(head)) + head + body


def decode(frame: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """The message in ``frame``; a malformed or oversized frame raises :class:`TransportError`."""
    if len(frame) > max_bytes:
        raise TransportError(f"a message of {len(frame):,} bytes is over the limit of {max_bytes:,} bytes")
    try:
        (size,) = _LENGTH.unpack_from(frame)
        header = json.loads(frame[_LENGTH.size : _LENGTH.size + size])
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        body = frame[_LENGTH.size + size :]
        return _build(header, _arrays(header, body))
    except TransportError:
        raise
    except Exception as exc:  # any malformation: bad JSON, a missing or mistyped field, bad safetensors
        raise TransportError(f"malformed message ({len(frame):,} bytes): {exc}") from exc


def _extra(extra: dict[str, Weights]) -> dict[str, Weights]:
    for group in extra:
        if not group or "/" in group or group == "weights":
            raise ValueError(f"an extra group name must be a non-empty name without '/', got {group!r}")
    return {f"extra/{group}": arrays for group, arrays in extra.items()}


def _arrays(header: dict[str, Any], body: bytes) -> dict[str, Weights]:
    loaded = safetensors.numpy.load(body) if body else {}
    sections = _get(header, "arrays", dict)
    return {section: {name: loaded[f"{section}/{name}"] for name in names} for section, names in sections.items()}


def _get(header: dict[str, Any], key: str, kind: type) -> Any:
    value = header[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _build(header: dict[str, Any], arrays: dict[str, Weights]) -> Message:
    kind = _get(header, "type", str)
    extra = {section.removeprefix("extra/"): group for section, group in arrays.items() if section != "weights"}
    weights = arrays.get("weights", {})
    if kind == "task":
        return Task(
            id=_get(header, "id", str),
            site=_get(header, "site", str),
            kind=_get(header, "kind", str),
            round=_get(header, "round", int),
            num_rounds=_get(header, "num_rounds", int),
            payload=Payload(weights, extra, _get(header, "config", dict)),
        )
    if kind == "result":
        failure = header["failure"]
        metrics = _get(header, "metrics", dict)
        return Result(
            task_id=_get(header, "task_id", str),
            site=_get(header, "site", str),
            num_samples=_get(header, "num_samples", int),
            metrics={str(key): _get(metrics, key, float) for key in metrics},
            weights=weights,
            extra=extra,
            failure=None
            if failure is None
            else Failure(_get(failure, "site", str), _get(failure, "phase", str), _get(failure, "reason", str)),
        )
    if kind == "events":
        events = [WireEvent(_get(e, "name", str), _get(e, "data", dict)) for e in _get(header, "events", list)]
        return EventBatch(
            site=_get(header, "site", str),
            session=_get(header, "session", str),
            first_seq=_get(header, "first_seq", int),
            events=events,
        )
    if kind == "ack":
        return EventAck(_get(header, "site", str), _get(header, "session", str), _get(header, "seq", int))
    if kind == "join":
        sites = _get(header, "sites", list)
        if not all(isinstance(site, str) for site in sites):
            raise TypeError("'sites' must be a list of str")
        return Join(sites)
    if kind == "shutdown":
        return Shutdown(_get(header, "reason", str))
    raise TransportError(f"unknown message type {kind!r}")
