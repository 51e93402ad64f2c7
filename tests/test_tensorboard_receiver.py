"""TensorBoardReceiver on a deployed server: what a killed server's receiver wrote is written once."""

from __future__ import annotations

import pickle
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedstream.events import Forwarded
from fedstream.server.receiver import JobInfo, JobOutcome
from fedstream.tracking import TensorBoardReceiver
from fedstream.tracking.records import METRIC, Record
from fedstream.workflows.base import RoundCompleted, RoundSummary


def metric(step: int, position: int) -> Forwarded:
    return Forwarded(
        "fed.analytics", "site-1", Record(METRIC, "loss", float(step), step, 1e9 + step).to_wire(), position
    )


def opened(workspace: Path) -> TensorBoardReceiver:
    receiver = TensorBoardReceiver()
    job = JobInfo("job", "id", "", ("site-1",), workspace, {})
    receiver.check(job)
    receiver.open(job)
    return receiver


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_a_batch_written_before_a_kill_is_not_written_again(tmp_path: Path) -> None:
    # The killed server's receiver wrote steps 1-10 and round 1 (their mark reached the journal), then steps
    # 11-20 (the mark did not), and was killed in the middle of steps 21-25. The journal gives the next server's
    # receiver everything from step 11 on.
    assert pickle.loads(pickle.dumps(metric(1, 7))).position == 7, "positions reach the receiver's process"
    round_1 = RoundCompleted(RoundSummary(1, 1.0, ["site-1"], 10, {"accuracy": 0.5}), position=11)
    first = opened(tmp_path)
    first.write([metric(step, step) for step in range(1, 11)] + [round_1])
    first.write([metric(step, step + 1) for step in range(11, 21)])
    site_file = next((tmp_path / "tb_events" / "site-1").iterdir())
    whole = site_file.stat().st_size
    first.write([metric(step, step + 1) for step in range(21, 26)])
    site_file.write_bytes(site_file.read_bytes()[: (whole + site_file.stat().st_size) // 2])  # killed mid-batch
    assert scalars(site_file.parent, "loss")[-1][0] in range(21, 25), "the file holds part of the last batch"

    second = opened(tmp_path)
    assert site_file.stat().st_size == whole, "the part of a batch after the last record of positions is cut"
    second.write([metric(step, step + 1) for step in range(11, 26)] + [round_1])
    second.write([metric(step, step + 1) for step in range(26, 31)])
    second.close(JobOutcome("completed", ""))
    assert scalars(site_file.parent, "loss") == [(step, float(step)) for step in range(1, 31)]
    assert scalars(tmp_path / "tb_events" / "server", "accuracy") == [(1, 0.5)]


def test_a_simulators_events_have_no_positions_and_are_all_written(tmp_path: Path) -> None:
    receiver = opened(tmp_path)
    receiver.write([metric(step, 0) for step in range(1, 4)])
    receiver.write([metric(step, 0) for step in range(4, 7)])
    receiver.close(JobOutcome("completed", ""))
    assert scalars(tmp_path / "tb_events" / "site-1", "loss") == [(step, float(step)) for step in range(1, 7)]
    (written,) = (tmp_path / "tb_events" / "site-1").iterdir()
    assert b"written through" not in written.read_bytes()


def test_a_damaged_file_is_kept_as_it_is(tmp_path: Path) -> None:
    first = opened(tmp_path)
    first.write([metric(step, step) for step in range(1, 6)])
    first.write([metric(step, step) for step in range(6, 11)])
    (path,) = (tmp_path / "tb_events" / "site-1").iterdir()
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # a record of the second batch is damaged
    path.write_bytes(data)
    second = opened(tmp_path)
    assert path.read_bytes() == data, "nothing is cut from a damaged file"
    second.write([metric(step, step) for step in range(6, 13)])
    second.close(JobOutcome("completed", ""))
    steps = [step for step, _ in scalars(path.parent, "loss")]
    assert steps[:5] == [1, 2, 3, 4, 5] and steps[-7:] == list(range(6, 13)), "the first batch's mark holds"
