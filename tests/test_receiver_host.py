"""ReceiverHost: a receiver in its own process, fed in order, with backpressure, outages and deadlines."""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path

import pytest

from fedstream.errors import TrackingError
from fedstream.events import EventBus, Forwarded
from fedstream.messages import EventBatch, WireEvent
from fedstream.server import journal as server_journal
from fedstream.server.inbox import Inbox
from fedstream.server.journal import EventJournal, Taken
from fedstream.server.receiver import JobInfo, JobOutcome
from fedstream.server.receiver_host import ReceiverHost
from fedstream.workflows.base import RoundCompleted, RoundSummary
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


def test_a_killed_servers_receivers_get_again_what_they_had_not_written(tmp_path: Path) -> None:
    # The first server writes batch A, then its backend goes down and batch B waits; the server is killed (its
    # objects abandoned). The next one takes the sites' numbering from the journal and gives B again, not A.
    path = tmp_path / "server" / "events.jsonl"
    info = JobInfo("job", "id", "", ("site-1",), tmp_path / "server", {})
    (tmp_path / "server").mkdir()

    def server(control: Path) -> tuple[ReceiverHost, Inbox, EventJournal, Taken]:
        control.mkdir()
        host = ReceiverHost("files", FileReceiver(control=str(control)))
        journal = EventJournal(path, lambda: host.oldest_unwritten)
        taken = journal.open()
        host.start(info, lambda why: None, functools.partial(journal.mark, "files"))
        bus = EventBus()
        bus.subscribe("fed.analytics", host.handle)
        for again in taken.unwritten("files", host.events):
            host.handle(again)
        return host, Inbox(bus, journal), journal, taken

    def batch(first: int, last: int) -> EventBatch:
        events = [WireEvent("fed.analytics", {"value": n}) for n in range(first, last + 1)]
        return EventBatch("site-1", "s1", first, events)

    first, inbox, _, taken = server(tmp_path / "first")
    assert taken == Taken()
    assert inbox.receive("site-1", batch(1, 20)) == 20
    wait_for(lambda: len(written(tmp_path / "first")) == 20 and first.oldest_unwritten is None, "A written")
    (tmp_path / "first" / "down").touch()
    assert inbox.receive("site-1", batch(21, 35)) == 35
    wait_for(lambda: first.unavailable != "", "the outage to be noticed")

    second, inbox, journal, taken = server(tmp_path / "second")
    assert taken.sites == {"site-1": ("s1", 35)} and taken.marks == {"files": 21}
    assert inbox.receive("site-1", batch(21, 35)) == 35, "a resend of B (its acknowledgement was lost) is known"
    assert inbox.receive("site-1", batch(36, 40)) == 40
    second.stop(JobOutcome("completed", ""))
    journal.close()
    assert written(tmp_path / "second") == list(range(21, 41))
    assert not path.exists(), "the job ended: its journal is removed"
    first.hurry()
    first.stop(JobOutcome("failed", "killed"))
    assert written(tmp_path / "first") == list(range(1, 21))


def test_the_server_journal_drops_what_is_written_and_reads_back_despite_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_journal, "COMPACT_EVERY", 30)
    path = tmp_path / "events.jsonl"
    oldest: list[int | None] = [None]
    journal = EventJournal(path, lambda: oldest[0])
    journal.open()
    given: list[int] = []
    for n in range(1, 101):
        if n % 10:
            journal.append(f"site-{n % 2}", "s", n, [WireEvent("fed.x", {"n": n})], given.append)
        else:
            journal.append_round(RoundSummary(n // 10, 1.0, ["site-1"], 1, {"acc": n / 100}), given.append)
        assert given[-1] == n
        oldest[0] = n - 3  # a receiver is three events behind
        journal.mark("r", n - 3)
    assert len(path.read_bytes().splitlines()) < 100, "written anew without what was written"
    taken = EventJournal(path, lambda: None).open()
    assert taken.next == 101 and taken.sites == {"site-0": ("s", 98), "site-1": ("s", 99)}
    unwritten = taken.unwritten("r", {"fed.x", RoundCompleted.name})
    assert [event.position for event in unwritten] == [97, 98, 99, 100]
    assert [event.data["n"] for event in unwritten[:3]] == [97, 98, 99]  # type: ignore[union-attr]
    assert unwritten[3] == RoundCompleted(RoundSummary(10, 1.0, ["site-1"], 1, {"acc": 1.0}), 100)
    assert taken.unwritten("r", {"fed.y"}) == [] and len(taken.unwritten("new", {"fed.x"})) >= 3
    with path.open("ab") as file:
        file.write(b'{"receiver":"r","below":99}\n{"site":"site-1","at":101,"even')  # a line cut short
    again = EventJournal(path, lambda: None)
    taken = again.open()
    assert (taken.next, taken.marks["r"], taken.last_round) == (101, 99, 10)
    # A server killed between announcing round 10 and its checkpoint runs round 10 again: recorded once.
    given.clear()
    again.append_round(RoundSummary(10, 2.0, ["site-1"], 1, {"acc": 1.0}), given.append)
    again.append_round(RoundSummary(11, 1.0, ["site-1"], 1, {"acc": 1.0}), given.append)
    assert given == [101] and EventJournal(path, lambda: None).open().last_round == 11
