import json
import pickle
import struct

import numpy as np
import pytest

from fedstream.errors import TransportError
from fedstream.messages import EventAck, EventBatch, Result, Shutdown, Task, decode, encode


def weights() -> dict[str, np.ndarray]:
    return {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "a.bias": np.array([0.5, -1.5], dtype=np.float64),
    }


def test_task_round_trips_with_weights_in_order() -> None:
    task = Task(id="t1", site="site-1", name="train", round=2, num_rounds=5, weights=weights())
    back = decode(encode(task))
    assert isinstance(back, Task)
    assert (back.id, back.site, back.name, back.round, back.num_rounds) == ("t1", "site-1", "train", 2, 5)
    assert list(back.weights) == list(task.weights)
    for key, value in task.weights.items():
        assert back.weights[key].dtype == value.dtype
        np.testing.assert_array_equal(back.weights[key], value)


def test_result_event_batch_ack_and_shutdown_round_trip() -> None:
    result = Result("t9", "site-2", 128, {"accuracy": 0.5, "loss": float("nan")}, weights(), "")
    back = decode(encode(result))
    assert isinstance(back, Result)
    assert back.num_samples == 128 and back.metrics["accuracy"] == 0.5 and np.isnan(back.metrics["loss"])
    failed = decode(encode(Result("t9", "site-2", error="ValueError: boom")))
    assert isinstance(failed, Result) and failed.error == "ValueError: boom" and failed.weights == {}
    batch = EventBatch(
        "site-1", 41, [("fed.analytics", ["metric", "loss", 0.25, 3, 1700000000.5]), ("fed.x", {"k": 1})]
    )
    assert decode(encode(batch)) == batch
    assert decode(encode(EventAck("site-1", 42))) == EventAck("site-1", 42)
    assert decode(encode(Shutdown("done"))) == Shutdown("done")


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x05\x00\x00\x00{bad}", b"\x02\x00\x00\x00{}", pickle.dumps({"type": "task"})],
    ids=["empty", "bad-json", "missing-fields", "a-pickle"],
)
def test_malformed_frames_raise_transport_error(frame: bytes) -> None:
    with pytest.raises(TransportError, match="malformed message"):
        decode(frame)


def test_unknown_message_type_is_rejected() -> None:
    header = json.dumps({"type": "nope", "keys": []}).encode()
    with pytest.raises(TransportError, match="unknown message type 'nope'"):
        decode(struct.pack("<I", len(header)) + header)
