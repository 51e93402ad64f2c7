"""The server's end of a deployment (PullLink): delivery that survives lost replies and restarts, absent
sites, identity checks, and the end of a job."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fedstream.deploy.server_link import PullLink, Refused, Rejoin
from fedstream.messages import EventAck, EventBatch, Join, Result, Shutdown, Task, WireEvent


class Recorder:
    """A ServerEndpoint that keeps what the link delivered."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def site_joined(self, site: str) -> None:
        self.calls.append(("joined", site))

    def site_left(self, site: str, reason: str) -> None:
        self.calls.append(("left", (site, reason)))

    def task_started(self, task_id: str) -> None:
        self.calls.append(("started", task_id))

    def result_received(self, site: str, result: Result) -> None:
        self.calls.append(("result", (site, result)))

    def events_received(self, site: str, batch: EventBatch) -> int:
        self.calls.append(("events", site))
        return batch.first_seq + len(batch.events) - 1

    def results(self) -> list[Result]:
        return [value[1] for kind, value in self.calls if kind == "result"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _link(absent_after_s: float = 30.0) -> tuple[PullLink, Recorder, Clock]:
    clock, recorder = Clock(), Recorder()
    link = PullLink(["site-1", "site-2"], absent_after_s=absent_after_s, clock=clock)
    link.start(recorder)
    return link, recorder, clock


def _task(n: int, site: str = "site-1") -> Task:
    return Task(f"t{n}", site, "train", 1, 1)


def test_a_task_comes_again_until_the_site_has_it_and_then_its_result_counts_once() -> None:
    link, recorder, _ = _link()
    link.join("site-1", "a")
    link.send(_task(1))
    link.send(_task(2))
    assert link.poll("site-1", "a", "", 0) == _task(1)
    assert link.poll("site-1", "a", "", 0) == _task(1)  # the first reply was lost
    assert link.poll("site-1", "a", "t1", 0) is None  # the site has it: nothing new while it runs
    assert [value for kind, value in recorder.calls if kind == "started"] == ["t1"]
    link.receive("site-1", "a", Result("t1", "site-1", 5))
    link.receive("site-1", "a", Result("t1", "site-1", 5))  # a resend after a lost reply
    assert len(recorder.results()) == 1
    assert link.poll("site-1", "a", "t1", 0) == _task(2)


def test_events_are_acknowledged_in_the_reply() -> None:
    link, _, _ = _link()
    link.join("site-1", "a")
    batch = EventBatch("site-1", "s", 1, [WireEvent("fed.x", {}), WireEvent("fed.x", {})])
    assert link.receive("site-1", "a", batch) == EventAck("site-1", "s", 2)


@pytest.mark.parametrize(
    "message",
    [
        Result("t1", "site-2", 1),
        EventBatch("site-2", "s", 1, []),
        Join(["site-1"]),
    ],
)
def test_a_site_speaks_only_for_itself(message: Any) -> None:
    link, recorder, _ = _link()
    link.join("site-1", "a")
    link.send(_task(1))
    link.poll("site-1", "a", "", 0)
    with pytest.raises(Refused):
        link.receive("site-1", "a", message)
    assert recorder.results() == []


def test_strangers_and_old_instances_are_refused() -> None:
    link, _, _ = _link()
    with pytest.raises(Refused, match="not one of this job's sites"):
        link.join("site-9", "a")
    with pytest.raises(Rejoin):
        link.poll("site-1", "a", "", 0)  # never joined
    link.join("site-1", "a")
    link.join("site-1", "b")
    with pytest.raises(Rejoin):
        link.poll("site-1", "a", "", 0)


def test_a_restarted_site_runs_its_interrupted_task_again_once() -> None:
    link, recorder, _ = _link()
    link.join("site-1", "a")
    link.send(_task(1))
    link.send(_task(2))
    assert link.poll("site-1", "a", "", 0) == _task(1)
    link.join("site-1", "b")  # the site's process was restarted: the new one runs the task it was running
    assert recorder.results() == []
    assert link.poll("site-1", "b", "", 0) == _task(1)
    link.join("site-1", "c")  # restarted again while running it: it fails, and the queue stays
    (failed,) = recorder.results()
    assert failed.task_id == "t1" and failed.failure is not None
    assert "restarted while running it, also when it was sent again" in failed.failure.reason
    assert link.poll("site-1", "c", "", 0) == _task(2)
    link.receive("site-1", "c", Result("t1", "site-1", 5))  # the old task's late result is ignored
    assert len(recorder.results()) == 1


def test_a_site_running_in_two_processes_fails_its_tasks_and_says_why() -> None:
    link, recorder, _ = _link()
    link.join("site-1", "a")
    link.join("site-1", "b")  # a restart, as far as the link can tell
    link.send(_task(1))
    assert link.poll("site-1", "b", "", 0) == _task(1)
    link.join("site-1", "a")  # a replaced process comes back: the same kit runs twice
    (failed,) = recorder.results()
    assert failed.task_id == "t1" and failed.failure is not None
    assert failed.failure.reason == (
        "site-1 runs in two processes at once (instances b and a): its kit is started twice, on this machine or "
        "another; stop one"
    )


def test_a_silent_site_is_absent_its_tasks_fail_and_it_may_come_back() -> None:
    link, recorder, clock = _link(absent_after_s=30)
    link.join("site-1", "a")
    link.join("site-2", "c")
    link.send(_task(1))
    link.poll("site-1", "a", "", 0)
    clock.now = 20
    link.poll("site-2", "c", "", 0)
    clock.now = 31
    link.mark_absent()
    assert [r.task_id for r in recorder.results()] == ["t1"]
    assert ("left", ("site-1", "silent for 31 s")) in recorder.calls
    assert not any(kind == "left" and value[0] == "site-2" for kind, value in recorder.calls)
    link.send(_task(2))  # fails at once while the site is absent
    assert [r.task_id for r in recorder.results()] == ["t1", "t2"]
    with pytest.raises(Rejoin):
        link.poll("site-1", "a", "", 0)
    link.join("site-1", "a")
    link.send(_task(3))
    assert link.poll("site-1", "a", "t1", 0) == _task(3)


def test_a_site_that_never_connects_fails_its_tasks_after_the_wait() -> None:
    link, recorder, clock = _link(absent_after_s=30)
    link.join("site-1", "a")
    link.send(_task(1, "site-2"))
    clock.now = 29
    link.mark_absent()
    assert recorder.results() == []
    clock.now = 31
    link.poll("site-1", "a", "", 0)
    link.mark_absent()
    (failed,) = recorder.results()
    assert failed.failure is not None and "did not connect within 30 s" in failed.failure.reason
    assert not any(kind == "left" for kind, _ in recorder.calls)


def test_cancelled_tasks_are_not_delivered_and_their_results_are_ignored() -> None:
    link, recorder, _ = _link()
    link.join("site-1", "a")
    for n in (1, 2, 3):
        link.send(_task(n))
    link.poll("site-1", "a", "", 0)
    link.cancel({"t1", "t2"})
    link.receive("site-1", "a", Result("t1", "site-1", 5))
    assert recorder.results() == []
    assert link.poll("site-1", "a", "t1", 0) == _task(3)


def test_close_ends_the_job_for_every_site_and_waits_for_their_goodbye() -> None:
    link, _, _ = _link()
    link.join("site-1", "a")
    link.join("site-2", "c")
    closed = threading.Thread(target=link.close, kwargs={"timeout_s": 60})
    closed.start()
    assert link.poll("site-1", "a", "", 5) == Shutdown("job finished")
    link.leave("site-1", "a")
    assert link.poll("site-2", "c", "", 5) == Shutdown("job finished")
    assert closed.is_alive()
    link.leave("site-2", "c")
    closed.join(30)
    assert not closed.is_alive()
    assert link.finished("site-1") and link.finished("site-2")


def test_a_poll_waits_for_the_next_task() -> None:
    link, _, _ = _link()
    link.join("site-1", "a")
    got: list[Any] = []
    poller = threading.Thread(target=lambda: got.append(link.poll("site-1", "a", "", 30)))
    poller.start()
    link.send(_task(1))
    poller.join(30)
    assert got == [_task(1)]


def test_a_site_that_stops_early_fails_what_it_still_had() -> None:
    link, recorder, _ = _link()
    link.join("site-1", "a")
    link.send(_task(1))
    link.send(_task(2))
    link.poll("site-1", "a", "", 0)
    link.leave("site-1", "a")
    assert [(r.task_id, r.failure is not None) for r in recorder.results()] == [("t1", True), ("t2", True)]
    link.send(_task(3))  # fails at once
    assert [r.task_id for r in recorder.results()] == ["t1", "t2", "t3"]
