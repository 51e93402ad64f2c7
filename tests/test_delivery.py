"""Site -> server event delivery: exactly once, in order, whatever the link loses or repeats."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from fedstream.errors import FedstreamError
from fedstream.events import EventBus, Forwarded
from fedstream.messages import TASK_STARTED, EventBatch, WireEvent
from fedstream.server.inbox import Inbox
from fedstream.server.journal import EventJournal
from fedstream.site import journal as journal_module
from fedstream.site.journal import Journal
from fedstream.site.outbox import Forwarder, Outbox


@dataclass(frozen=True)
class Numbered:
    """A forwardable site event carrying a number."""

    name: ClassVar[str] = "analytics"
    number: int

    def to_wire(self) -> dict[str, Any]:
        return {"number": self.number}


def event(n: Any, name: str = "e") -> WireEvent:
    return WireEvent(name, {"n": n})


class FaultyLink:
    """Carries batches from an outbox to an inbox and acknowledgements back, losing or repeating some."""

    def __init__(
        self,
        inbox: Inbox,
        *,
        drop_batch: Callable[[int], bool],
        drop_ack: Callable[[int], bool],
        repeat: Callable[[int], bool],
    ) -> None:
        self.inbox, self.drop_batch, self.drop_ack, self.repeat = inbox, drop_batch, drop_ack, repeat
        self.outbox: Outbox | None = None
        self.sent = 0

    def send(self, batch: EventBatch) -> None:
        self.sent += 1
        n = self.sent
        if self.drop_batch(n):
            return
        for _ in range(2 if self.repeat(n) else 1):
            seq = self.inbox.receive("site-1", batch)
            if not self.drop_ack(n):
                assert self.outbox is not None
                self.outbox.acknowledge(seq)


def pipeline(**faults: Callable[[int], bool]) -> tuple[Outbox, list[Forwarded], FaultyLink, Inbox]:
    server_bus = EventBus()
    seen: list[Forwarded] = []
    server_bus.subscribe("fed.analytics", seen.append)
    inbox = Inbox(server_bus)
    no = lambda n: False  # noqa: E731
    link = FaultyLink(
        inbox,
        drop_batch=faults.get("drop_batch", no),
        drop_ack=faults.get("drop_ack", no),
        repeat=faults.get("repeat", no),
    )
    outbox = Outbox("site-1", link.send, batch_size=7, max_delay_s=0.01, ack_timeout_s=0.05)
    link.outbox = outbox
    return outbox, seen, link, inbox


def test_exactly_once_in_order_despite_losses_and_repeats() -> None:
    outbox, seen, _, inbox = pipeline(
        drop_batch=lambda n: n % 3 == 0, drop_ack=lambda n: n % 4 == 1, repeat=lambda n: n % 2 == 0
    )
    site_bus = EventBus()
    Forwarder(site_bus, outbox, ["analytics"], "fed.")
    for i in range(500):
        site_bus.fire(Numbered(i))
    assert outbox.flush(stall_timeout_s=30)
    assert [event.data["number"] for event in seen] == list(range(500))
    assert all(event.site == "site-1" and event.name == "fed.analytics" for event in seen)
    assert outbox.resends > 0 and inbox.duplicates["site-1"] > 0, "the faults really happened"
    assert inbox.received["site-1"] == 500
    outbox.close(stall_timeout_s=5)


def test_flush_reports_when_the_server_never_answers() -> None:
    outbox, seen, link, _ = pipeline(drop_batch=lambda n: True)
    outbox.put(event(1.0, "fed.analytics"))
    assert outbox.flush(stall_timeout_s=0.3) is False
    assert outbox.unacknowledged == 1 and seen == []
    assert link.sent >= 2, "it kept resending"
    assert outbox.close(stall_timeout_s=0.1) == 1, "the undelivered event is counted"


def test_nothing_is_accepted_after_close() -> None:
    outbox, _, _, _ = pipeline()
    assert outbox.close(stall_timeout_s=1) == 0
    with pytest.raises(FedstreamError, match="has finished"):
        outbox.put(event(1))


def test_a_batch_after_a_gap_is_not_handled() -> None:
    bus = EventBus()
    seen: list[Forwarded] = []
    bus.subscribe("e", seen.append)
    inbox = Inbox(bus)
    assert inbox.receive("a", EventBatch("a", "s", 1, [event(1), event(2)])) == 2
    assert inbox.receive("a", EventBatch("a", "s", 5, [event(5)])) == 2, "events 3-4 are missing: resume from 3"
    assert inbox.receive("a", EventBatch("a", "s", 2, [event(2), event(3)])) == 3
    assert inbox.receive("b", EventBatch("b", "s", 1, [event("b1")])) == 1, "sites are numbered separately"
    assert [e.data["n"] for e in seen] == [1, 2, 3, "b1"]
    assert inbox.duplicates["a"] == 1
    assert inbox.receive("a", EventBatch("a", "s2", 1, [event(10)])) == 1, "a new session numbers from 1"
    assert seen[-1].data["n"] == 10


def started(task: str) -> WireEvent:
    return WireEvent(TASK_STARTED, {"task": task})


def record(kind: str, key: str, step: int, value: Any) -> WireEvent:
    return WireEvent("fed.analytics", {"kind": kind, "key": key, "step": step, "value": value})


def test_a_task_run_again_logs_only_the_steps_its_first_run_had_not() -> None:
    # A site's process is killed in the middle of task T (after steps 0-2 of "loss", and the param); its next
    # process runs T again and logs steps 0-4 and the param again. Then task U logs from step 0 anew.
    bus = EventBus()
    seen: list[Forwarded] = []
    bus.subscribe("fed.analytics", seen.append)
    inbox = Inbox(bus)
    first = [started("T"), record("param", "lr", 0, "0.1"), *(record("metric", "loss", n, 1) for n in range(3))]
    second = [started("T"), record("param", "lr", 0, "0.1"), *(record("metric", "loss", n, 2) for n in range(5))]
    second += [record("metric", "acc", 0, 2), WireEvent("fed.analytics", {"key": "no step", "value": 2})]
    inbox.receive("a", EventBatch("a", "s", 1, first))
    inbox.receive("a", EventBatch("a", "s", 6, second[:4]))  # the second run spans two batches
    inbox.receive("a", EventBatch("a", "s", 10, second[4:]))
    inbox.receive("a", EventBatch("a", "s", 15, [started("U"), record("metric", "loss", 0, 3)]))
    kept = [(e.data["key"], e.data.get("step"), e.data["value"]) for e in seen]
    assert kept == [
        ("lr", 0, "0.1"),
        *(("loss", n, 1) for n in range(3)),
        ("loss", 3, 2),
        ("loss", 4, 2),
        ("acc", 0, 2),
        ("no step", None, 2),
        ("loss", 0, 3),
    ]
    assert inbox.repeats["a"] == 4 and inbox.received["a"] == 9, "the markers are neither received nor repeats"


def test_put_waits_for_room_instead_of_losing_events() -> None:
    release = threading.Event()
    server_bus = EventBus()
    inbox = Inbox(server_bus)
    outbox: Outbox

    def slow_send(batch: EventBatch) -> None:
        release.wait()
        outbox.acknowledge(inbox.receive("s", batch))

    outbox = Outbox("s", slow_send, batch_size=2, max_delay_s=0.01, ack_timeout_s=60, capacity=3)
    done = threading.Event()

    def producer() -> None:
        for i in range(10):
            outbox.put(event(i))
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.2), "the producer must wait while the queue is full"
    release.set()
    assert done.wait(10)
    assert outbox.flush(10)
    assert inbox.received["s"] == 10
    thread.join()
    outbox.close(5)


def test_a_trickle_of_events_leaves_within_max_delay_without_a_flush() -> None:
    outbox, seen, _, _ = pipeline()
    outbox.put(event("x", "fed.analytics"))
    deadline = time.monotonic() + 10
    while not seen:  # no flush(): the event must go on its own, after max_delay_s (0.01 s here)
        assert time.monotonic() < deadline, "a lone event never left the site"
        time.sleep(0.01)
    assert seen[0].data["n"] == "x"
    outbox.close(stall_timeout_s=5)


def test_batches_stay_small_when_events_carry_long_texts() -> None:
    outbox, seen, link, _ = pipeline()
    for i in range(12):
        outbox.put(WireEvent("fed.analytics", {"n": i, "text": "x" * 1_000_000}))
    assert outbox.flush(stall_timeout_s=30)
    assert [event.data["n"] for event in seen] == list(range(12))
    assert link.sent >= 3, "a batch closes at about 4 MB, not at 1000 events"
    outbox.close(stall_timeout_s=5)


def test_a_restarted_server_still_knows_what_a_task_logged_when_the_sites_process_restarts_too(tmp_path: Path) -> None:
    # The server and site-1's process are both killed in the middle of task T, after steps 0-2 of "loss" (the
    # first run); the next server reads its journal, and site-1's next process runs T again: steps 0-4.
    path = tmp_path / "events.jsonl"

    def server() -> tuple[Inbox, list[Any]]:
        bus, seen = EventBus(), []
        bus.subscribe("fed.analytics", lambda event: seen.append((event.data["step"], event.data["value"])))
        journal = EventJournal(path, lambda: None)
        journal.open()
        return Inbox(bus, journal), seen

    inbox, seen = server()
    inbox.receive(
        "site-1", EventBatch("site-1", "s1", 1, [started("T"), *(record("metric", "loss", n, 1) for n in range(3))])
    )
    assert seen == [(0, 1), (1, 1), (2, 1)]
    inbox, seen = server()  # restarted
    second = [started("T"), *(record("metric", "loss", n, 2) for n in range(5))]
    inbox.receive("site-1", EventBatch("site-1", "s2", 1, second))  # a new process: a new session
    assert seen == [(3, 2), (4, 2)], "the steps the first run logged are not logged again"
    assert inbox.repeats["site-1"] == 3
    inbox, seen = server()  # restarted again, in the middle of the second run
    inbox.receive("site-1", EventBatch("site-1", "s3", 1, second))
    assert seen == [], "what the second run logged is not logged again either"


def test_a_damaged_task_record_in_the_journal_is_refused_like_any_damaged_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.jsonl"
    journal = EventJournal(path, lambda: None)
    journal.open()
    steps = {"task": "T", "last": [["fed.analytics", "metric", "loss", 0]], "logged": []}
    journal.append("site-1", "s1", 1, [record("metric", "loss", 0, 1)], lambda at: None, steps)
    damaged = {
        "at": 2,
        "site": "site-1",
        "session": "s1",
        "handled": 2,
        "events": [],
        "task": {"task": "T", "last": [["x"]]},
    }
    with path.open("a") as file:
        file.write(json.dumps(damaged) + "\n")
    again = EventJournal(path, lambda: None)
    again.open()
    assert again.tasks == {"site-1": steps} and again.sites == {"site-1": ("s1", 1)}
    assert "line 3 is damaged" in caplog.text


def test_a_new_server_takes_a_sessions_events_from_where_they_stand() -> None:
    # After a server restart, a site's first batch is its oldest unacknowledged one, numbered past 1.
    bus = EventBus()
    seen: list[Any] = []
    bus.subscribe("fed.x", lambda event: seen.append(event.data["n"]))
    inbox = Inbox(bus)
    batch = EventBatch("site-1", "s1", 501, [WireEvent("fed.x", {"n": n}) for n in (501, 502)])
    assert inbox.receive("site-1", batch) == 502
    assert inbox.receive("site-1", batch) == 502  # a resend
    assert seen == [501, 502]
    fresh = EventBatch("site-1", "s2", 1, [WireEvent("fed.x", {"n": 1})])  # the site was set up again
    assert inbox.receive("site-1", fresh) == 1
    assert seen == [501, 502, 1]


def journaled(inbox: Inbox, path: Path, *, deliver: Callable[[int], bool]) -> tuple[Outbox, FaultyLink]:
    """An outbox journaling to ``path``, sending to ``inbox`` the batches that ``deliver`` lets through."""
    link = FaultyLink(inbox, drop_batch=lambda n: not deliver(n), drop_ack=lambda n: False, repeat=lambda n: False)
    outbox = Outbox("site-1", link.send, batch_size=7, max_delay_s=0.01, ack_timeout_s=0.05, journal=path)
    link.outbox = outbox
    return outbox, link


def test_a_next_outbox_of_the_site_delivers_what_a_killed_one_left(tmp_path: Path) -> None:
    server_bus = EventBus()
    seen: list[Any] = []
    server_bus.subscribe("fed.x", lambda e: seen.append(e.data["n"]))
    inbox = Inbox(server_bus)
    journal = tmp_path / "site-1" / "outbox.jsonl"
    killed = threading.Event()
    first, _ = journaled(inbox, journal, deliver=lambda n: not killed.is_set())
    for n in range(50):
        first.put(event(n, "fed.x"))
    assert first.flush(stall_timeout_s=30)
    killed.set()  # from now on nothing of the first outbox reaches the server: as if its process were killed
    for n in range(50, 80):
        first.put(event(n, "fed.x"))
    assert seen == list(range(50))
    assert first.close(stall_timeout_s=0) == 30, "its thread stops; its journal keeps what was not delivered"
    second, _ = journaled(inbox, journal, deliver=lambda n: True)
    assert second.session == first.session
    for n in range(80, 100):
        second.put(event(n, "fed.x"))
    assert second.flush(stall_timeout_s=30)
    assert seen == list(range(100)), "the killed outbox's 30 events once, in order, before the new ones"
    assert second.close(stall_timeout_s=5) == 0
    assert not journal.exists(), "everything delivered: the journal is removed"


def test_a_journal_reads_back_despite_a_cut_last_line_and_stays_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "COMPACT_AFTER_LINES", 20)
    path = tmp_path / "outbox.jsonl"
    inbox = Inbox(EventBus())
    outbox, _ = journaled(inbox, path, deliver=lambda n: True)
    for n in range(100):
        outbox.put(event(n))
    assert outbox.flush(stall_timeout_s=30)
    assert len(path.read_bytes().splitlines()) < 40, "rewritten once everything was acknowledged"
    with path.open("ab") as file:
        file.write(b'["e",{"n":100}]\n["e",{"n":10')  # one more event, then a line cut short by a full disk
    session, acked, events = Journal(path).read() or ("", 0, [])
    assert (session, acked, events) == (outbox.session, 100, [event(100)])
    for damage in (b"5\n", b'["e"]\n', b'{"session": "s"}\n', b"[1, 2]\n"):  # edited by hand: read up to there
        path.write_bytes(b'{"session":"s","acked":3}\n["e",{"n":4}]\n' + damage + b'["e",{"n":5}]\n')
        assert Journal(path).read() == ("s", 3, [event(4)])
    outbox.close(stall_timeout_s=5)


def test_an_outbox_whose_journal_cannot_be_written_still_delivers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a-file").write_text("")
    server_bus = EventBus()
    seen: list[Any] = []
    server_bus.subscribe("fed.x", lambda e: seen.append(e.data["n"]))
    outbox, _ = journaled(Inbox(server_bus), tmp_path / "a-file" / "outbox.jsonl", deliver=lambda n: True)
    for n in range(10):
        outbox.put(event(n, "fed.x"))
    assert outbox.flush(stall_timeout_s=30) and seen == list(range(10))
    assert "cannot write the events journal" in caplog.text and "a-file" in caplog.text
    assert outbox.close(stall_timeout_s=5) == 0
