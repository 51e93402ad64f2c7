"""The byte encoding of :mod:`fedstream.messages`: a JSON header by field name, then the arrays.

A frame is ``<4-byte header length><JSON header><safetensors body>``. The header names the message type and
holds every field but the arrays, by name; the body holds the arrays (``weights/<name>``,
``extra/<group>/<name>``) in safetensors format. Never a pickle, so a message cannot make the receiving
process run code. :func:`decode` checks every field's type and refuses frames over a size limit.

Models are large, so neither side copies them: :func:`encode_parts` gives the frame as pieces whose array
data are views of the message's own arrays, and :func:`decode` returns arrays that are views of the frame
(aligned: the body's tensors are laid out by item size, after a header padded to 8 bytes).
"""

from __future__ import annotations

import json
import mmap
import struct
from typing import Any

import numpy as np

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
    return b"".join(encode_parts(message))


def encode_parts(message: Message) -> list[bytes | memoryview]:
    """``message`` as the pieces of one frame, in order; the arrays' data are not copied."""
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
    text = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    head = _LENGTH.pack(len(text)) + text
    return [head, *_safetensors(flat, len(head))] if flat else [head]


_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_NAMES = {np.dtype(dtype): name for name, dtype in _DTYPES.items()}


def sendable(dtype: np.dtype) -> bool:
    """Whether arrays of ``dtype`` can travel (the safetensors dtypes numpy has)."""
    return dtype.newbyteorder("=") in _NAMES


def _safetensors(arrays: dict[str, np.ndarray], offset: int) -> list[bytes | memoryview]:
    """The safetensors body of ``arrays`` as pieces, for a body that starts ``offset`` bytes into the frame:
    tensors by descending item size, after a header padded so that each tensor's data is aligned."""
    laid = sorted(arrays.items(), key=lambda item: -item[1].dtype.itemsize)
    meta: dict[str, Any] = {}
    data: list[bytes | memoryview] = []
    start = 0
    for name, array in laid:
        contiguous = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        kind = _NAMES.get(contiguous.dtype.newbyteorder("="))
        if kind is None:
            raise TypeError(f"array {name!r} has dtype {array.dtype}, which cannot be sent")
        meta[name] = {
            "dtype": kind,
            "shape": list(contiguous.shape),
            "data_offsets": [start, start + contiguous.nbytes],
        }
        start += contiguous.nbytes
        data.append(contiguous.reshape(-1).view(np.uint8).data)
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-(offset + 8 + len(text)) % 8)
    return [struct.pack("<Q", len(text)) + text, *data]


def decode(frame: bytes | bytearray | memoryview | mmap.mmap, *, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """The message in ``frame``; its arrays are views of ``frame``. A malformed or oversized frame raises
    :class:`TransportError`."""
    if len(frame) > max_bytes:
        raise TransportError(f"a message of {len(frame):,} bytes is over the limit of {max_bytes:,} bytes")
    view = memoryview(frame)
    try:
        (size,) = _LENGTH.unpack_from(view)
        header = json.loads(bytes(view[_LENGTH.size : _LENGTH.size + size]))
        if not isinstance(header, dict):
            raise TypeError("the header is not a JSON object")
        body = view[_LENGTH.size + size :]
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


def _load(body: memoryview) -> dict[str, np.ndarray]:
    """The tensors of a safetensors body, as views; every offset and size is checked, and the tensors must
    cover the data exactly (no gaps, no overlaps), as the format requires."""
    (size,) = struct.unpack_from("<Q", body)
    if size > len(body) - 8:
        raise ValueError(f"the safetensors header claims {size:,} bytes, more than the body holds")
    meta = json.loads(bytes(body[8 : 8 + size]))
    if not isinstance(meta, dict):
        raise TypeError("the safetensors header is not a JSON object")
    data = body[8 + size :]
    loaded, spans = {}, []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        shape = [int(n) for n in info["shape"]]
        start, end = (int(n) for n in info["data_offsets"])
        if min(shape, default=0) < 0 or not 0 <= start <= end <= len(data):
            raise ValueError(f"tensor {name!r} lies outside the data")
        if end - start != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"tensor {name!r} has {end - start} bytes for shape {shape} of {info['dtype']}")
        loaded[str(name)] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
        spans.append((start, end))
    covered = 0
    for start, end in sorted(spans):
        if start != covered:
            raise ValueError("the tensors leave gaps in the data or overlap")
        covered = end
    if covered != len(data):
        raise ValueError("the data holds bytes no tensor describes")
    return loaded


def _arrays(header: dict[str, Any], body: memoryview) -> dict[str, Weights]:
    loaded = _load(body) if len(body) else {}
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
