"""ReceiverHost: a receiver in its own process, fed in order, with backpressure, outages and deadlines."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fedstream.errors import TrackingError
from fedstream.events import Forwarded
from fedstream.server.receiver import JobInfo, JobOutcome
from fedstream.server.receiver_host import ReceiverHost
from tests.helpers import wait_for
from tests.receivers import FileReceiver


def event(value: object) -> Forwarded:
    return Forwarded("fed.analytics", "site-1", {"value": value})


def host_of(tmp_path: Path, **args: object) -> tuple[ReceiverHost, list[str], Path]:
    control = tmp_path / "control"
    control.mkdir()
    (tmp_path / "server").mkdir()
    host = ReceiverHost("files", FileReceiver(control=str(control), **args))  # type: ignore[arg-type]
    failures: list[str] = []
    host.start(JobInfo("job", "id", "", ("site-1",), tmp_path / "server", {}), failures.append)
    return host, failures, control


def written(control: Path) -> list[object]:
    path = control / "written.jsonl"
    return [json.loads(line)["value"] for line in path.read_text().splitlines()] if path.exists() else []


def test_events_are_written_in_order_and_counted(tmp_path: Path) -> None:
    host, failures, control = host_of(tmp_path)
    for i in range(95):
        host.handle(event(i))
    host.stop(JobOutcome("completed", ""))
    assert written(control) == list(range(95))
    report = host.report()
    assert (report.received, report.written, report.dropped, report.errors) == (95, 95, 0, [])
    assert report.details["path"].endswith("written.jsonl") and failures == []
    assert (control / "closed").read_text() == "completed"


def test_an_outage_holds_events_until_the_backend_is_back(tmp_path: Path) -> None:
    host, _, control = host_of(tmp_path)
    (control / "down").touch()
    for i in range(30):
        host.handle(event(i))
    wait_for(lambda: host.unavailable != "", "the host to notice the outage")
    (control / "down").unlink()
    host.stop(JobOutcome("completed", ""))
    assert written(control) == list(range(30))
    report = host.report()
    assert (report.written, report.dropped) == (30, 0)


def test_a_backend_that_stays_down_costs_only_what_is_past_the_bound(tmp_path: Path) -> None:
    host, _, control = host_of(tmp_path, max_pending=20, stop_timeout_s=0.5)
    (control / "down").touch()
    for i in range(20):
        host.handle(event(i))
    wait_for(lambda: host.unavailable != "", "the host to notice the outage")
    for i in range(20, 25):
        host.handle(event(i))  # past the bound while the backend is down: dropped at once, not waited for
    host.stop(JobOutcome("completed", ""))
    report = host.report()
    assert (report.received, report.written, report.dropped) == (25, 0, 25)
    assert any("later ones were dropped" in error and "down" in error for error in report.errors), report.errors
    assert any("could not be written by the end" in error for error in report.errors), report.errors


def test_a_slow_backend_slows_the_sender_instead_of_losing_events(tmp_path: Path) -> None:
    host, _, control = host_of(tmp_path, max_pending=10)
    (control / "hang").touch()
    done = threading.Event()

    def send() -> None:
        for i in range(40):
            host.handle(event(i))
        done.set()

    sender = threading.Thread(target=send)
    sender.start()
    wait_for(lambda: host.report().received == 11, "the sender to reach the bound")
    assert not done.is_set(), "the sender waits for room while the backend works"
    (control / "hang").unlink()
    sender.join(30)
    assert done.is_set()
    host.stop(JobOutcome("completed", ""))
    assert written(control) == list(range(40))
    assert host.report().dropped == 0


def test_the_deadline_holds_when_the_backend_hangs(tmp_path: Path) -> None:
    host, _, control = host_of(tmp_path, stop_timeout_s=1.0)
    (control / "hang").touch()
    for i in range(15):
        host.handle(event(i))
    began = time.monotonic()
    host.stop(JobOutcome("completed", ""))
    assert time.monotonic() - began < 10, "stop_timeout_s = 1 must not take much longer"
    report = host.report()
    assert report.dropped == 15 and report.written == 0
    assert any("not confirmed written" in error for error in report.errors), report.errors


def test_hurry_stops_the_wait_at_once(tmp_path: Path) -> None:
    host, _, control = host_of(tmp_path, stop_timeout_s=300.0)
    (control / "down").touch()
    host.handle(event(1))
    wait_for(lambda: host.unavailable != "", "the host to notice the outage")
    host.hurry()
    began = time.monotonic()
    host.stop(JobOutcome("interrupted", ""))
    assert time.monotonic() - began < 10
    assert host.report().dropped == 1


def test_refused_events_cost_only_themselves(tmp_path: Path) -> None:
    host, _, control = host_of(tmp_path, refuse="bad")
    for value in (1, "bad", 2, "bad", 3):
        host.handle(event(value))
    host.stop(JobOutcome("completed", ""))
    assert written(control) == [1, 2, 3]
    report = host.report()
    assert (report.written, report.dropped) == (3, 2) and "refused 'bad'" in report.errors


def test_a_failed_check_fails_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="checked and refused"):
        host_of(tmp_path, fail_check=True)


def test_a_receiver_that_cannot_open_stops_the_job_and_drops_what_comes(tmp_path: Path) -> None:
    host, failures, _ = host_of(tmp_path, fail_open=True)
    wait_for(lambda: bool(failures), "the failure to be reported")
    assert failures == ["receiver files: RuntimeError: cannot open the file backend"]
    host.handle(event(1))
    host.stop(JobOutcome("failed", ""))
    report = host.report()
    assert report.dropped == 1 and any("could not open" in error for error in report.errors)
