"""The byte encoding of messages: round trips by field name, arrays in safetensors, and refusals."""

import json
import pickle
import struct

import numpy as np
import pytest

from fedstream.errors import TransportError
from fedstream.messages import EventAck, EventBatch, Failure, Join, Payload, Result, Shutdown, Task, WireEvent
from fedstream.wire import decode, encode, encode_parts


def weights() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "a.bias": np.array([0.5, -1.5], dtype=np.float64),
    }


def assert_same_arrays(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype
        np.testing.assert_array_equal(got[key], value)


def test_task_round_trips_with_weights_extra_and_config_in_order() -> None:
    payload = Payload(weights(), {"control": {"c": np.ones(3, np.float32)}}, {"mu": 0.01, "names": ["a"]})
    task = Task(id="t1", site="site-1", kind="train", round=2, num_rounds=5, payload=payload)
    back = decode(encode(task))
    assert isinstance(back, Task)
    assert (back.id, back.site, back.kind, back.round, back.num_rounds) == ("t1", "site-1", "train", 2, 5)
    assert_same_arrays(back.payload.weights, task.payload.weights)
    assert list(back.payload.extra) == ["control"]
    assert_same_arrays(back.payload.extra["control"], payload.extra["control"])
    assert back.payload.config == {"mu": 0.01, "names": ["a"]}


def test_result_event_batch_ack_join_and_shutdown_round_trip() -> None:
    result = Result("t9", "site-2", 128, {"accuracy": 0.5, "loss": float("nan")}, weights())
    back = decode(encode(result))
    assert isinstance(back, Result)
    assert back.num_samples == 128 and back.metrics["accuracy"] == 0.5 and np.isnan(back.metrics["loss"])
    assert_same_arrays(back.weights, result.weights)
    failure = Failure("site-2", "train", "ValueError: boom")
    failed = decode(encode(Result("t9", "site-2", failure=failure)))
    assert isinstance(failed, Result) and failed.failure == failure and failed.weights == {}
    record = {"kind": "metric", "key": "loss", "value": 0.25, "step": 3, "time": 1700000000.5}
    batch = EventBatch("site-1", "s1", 41, [WireEvent("fed.analytics", record), WireEvent("fed.x", {"k": 1})])
    assert decode(encode(batch)) == batch
    assert decode(encode(EventAck("site-1", "s1", 42))) == EventAck("site-1", "s1", 42)
    assert decode(encode(Join(["site-1", "site-3"]))) == Join(["site-1", "site-3"])
    assert decode(encode(Shutdown("done"))) == Shutdown("done")


RESULT = {"type": "result", "task_id": "t", "site": "a", "num_samples": 1, "metrics": {}, "failure": None, "arrays": {}}
TASK = {
    "type": "task",
    "id": "t",
    "site": "a",
    "kind": "train",
    "round": 1,
    "num_rounds": 1,
    "config": {},
    "arrays": {},
}


def frame(header: dict[str, object]) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x05\x00\x00\x00{bad}",
        b"\x02\x00\x00\x00{}",
        pickle.dumps({"type": "task"}),
        frame({"type": "ack", "site": "a", "session": "s", "seq": "7", "arrays": {}}),
        frame({"type": "ack", "site": "a", "session": "s", "seq": True, "arrays": {}}),
        frame({"type": "join", "sites": ["a", 3], "arrays": {}}),
        frame({**RESULT, "metrics": {"x": "1"}}),
        frame({**TASK, "arrays": {"weights": ["w"]}}),
        frame([1, 2]),  # type: ignore[arg-type]
    ],
    ids=["empty", "bad-json", "missing-fields", "a-pickle", "str-seq", "bool-seq", "bad-site-list", "str-metric",
         "missing-array", "not-an-object"],
)  # fmt: skip
def test_malformed_frames_raise_transport_error(data: bytes) -> None:
    with pytest.raises(TransportError, match="malformed message"):
        decode(data)


def test_unknown_message_type_is_rejected() -> None:
    with pytest.raises(TransportError, match="unknown message type 'nope'"):
        decode(frame({"type": "nope", "arrays": {}}))


def test_a_frame_over_the_limit_is_refused_before_it_is_read() -> None:
    data = encode(Result("t1", "site-1", 1, weights={"w": np.zeros(1000, np.float32)}))
    with pytest.raises(TransportError, match=r"of [\d,]+ bytes is over the limit of 1,000 bytes"):
        decode(data, max_bytes=1000)


def test_extra_group_names_cannot_collide_with_the_weights() -> None:
    for name in ("", "a/b", "weights"):
        with pytest.raises(ValueError, match="extra group name"):
            encode(Task("t", "s", "train", 1, 1, Payload(extra={name: {}})))


def test_the_body_is_standard_safetensors_and_decoding_copies_nothing() -> None:
    import safetensors.numpy

    mixed = {"i8": np.arange(3, dtype=np.int8), "f64": np.arange(5, dtype=np.float64), "b": np.array([True])}
    parts = encode_parts(Result("t1", "site-1", 1, weights=mixed))
    frame = bytearray(b"".join(parts))
    head = struct.unpack_from("<I", frame)[0] + 4
    standard = safetensors.numpy.load(bytes(frame[head:]))
    assert_same_arrays({k.removeprefix("weights/"): standard[f"weights/{k}"] for k in mixed}, mixed)
    back = decode(frame)
    assert isinstance(back, Result)
    assert_same_arrays(back.weights, mixed)
    assert all(array.flags.aligned for array in back.weights.values())
    frame[-1] = 0  # the last tensor (by item size) is "b": the arrays are views of the frame, not copies
    assert not back.weights["b"][0]


def _body(meta: dict[str, object], data: bytes) -> bytes:
    text = json.dumps(meta).encode()
    header = {**RESULT, "arrays": {"weights": [name.removeprefix("weights/") for name in meta]}}
    return frame(header) + struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(
    ("meta", "data", "words"),
    [
        ({"weights/w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside"),
        ({"weights/w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "bytes for shape"),
        ({"weights/w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gaps"),
        ({"weights/w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "no tensor describes"),
        ({"weights/w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "C64"),
        ({"weights/w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "outside"),
    ],
    ids=["short-data", "wrong-size", "gap", "trailing-bytes", "unknown-dtype", "negative-shape"],
)
def test_malformed_safetensors_bodies_are_refused(meta: dict[str, object], data: bytes, words: str) -> None:
    with pytest.raises(TransportError, match=f"malformed message.*{words}"):
        decode(_body(meta, data))
