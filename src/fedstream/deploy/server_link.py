"""The server's end of a deployed job: sites that pull their tasks over the network.

A :class:`PullLink` is a :class:`~fedstream.link.ServerLink` whose sites come to it: the gRPC service
(:mod:`fedstream.deploy.server`) calls :meth:`PullLink.join`, :meth:`PullLink.poll`, :meth:`PullLink.receive`
and :meth:`PullLink.leave` with the site named by the caller's certificate. Each site has a queue of tasks and
at most one task it is running; a poll returns that task again until its result arrives (the reply may have
been lost), so delivery survives reconnects, and the site host ignores a task it already has.

A site process is one *instance*: a site that joins again with a new instance (its client restarted) has lost
the task it was running, which fails. A site whose polls stop for ``absent_after_s`` is marked absent: its
tasks fail, and later tasks fail at once until it joins again; the workflow's ``min_clients`` decides the rest.
A site that never joined within ``absent_after_s`` of the job's start is absent the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fedstream.link import ServerEndpoint
from fedstream.messages import EventAck, EventBatch, Failure, Message, Result, Shutdown, Task

log = logging.getLogger(__name__)


class Refused(Exception):
    """A call that the link does not accept; the message says why."""


class Rejoin(Exception):
    """The caller must join again (its instance is not the one the link knows)."""


@dataclass
class _Slot:
    """One site's state in the job."""

    name: str
    instance: str = ""
    queue: deque[Task] = field(default_factory=deque)
    running: Task | None = None
    seen: float = 0.0
    present: bool = False
    absent: bool = False  # marked absent: its tasks fail at once until it joins again
    left: bool = False  # said goodbye after the job's end
    declined: str = ""  # why the site will not run this job
    resent: set[str] = field(default_factory=set)  # tasks sent again because a restart interrupted them
    replaced: set[str] = field(default_factory=set)  # instances a newer one replaced (a restarted process)
    doubled: str = ""  # why the site seems to run in two processes at once

    def take_tasks(self) -> list[Task]:
        """The task it runs and those queued for it, which it will no longer get."""
        tasks = ([self.running] if self.running else []) + list(self.queue)
        self.running, self.queue = None, deque()
        return tasks


class PullLink:
    """A :class:`~fedstream.link.ServerLink` for sites that poll for their tasks.

    Args:
        sites: the job's sites.
        absent_after_s: a site silent this long (or never joined this long after the start) is absent.
        clock: ``time.monotonic`` (tests pass their own).
    """

    def __init__(
        self, sites: list[str], *, absent_after_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._slots = {site: _Slot(site) for site in sites}
        self._absent_after_s = absent_after_s
        self._clock = clock
        self._cond = threading.Condition()
        self._endpoint: ServerEndpoint | None = None
        self._began = clock()
        self._closing = False
        self._terminated = False
        self._stopped = threading.Event()

    # -- ServerLink -------------------------------------------------------------------------------------------
    def start(self, endpoint: ServerEndpoint) -> None:
        self._endpoint = endpoint
        self._began = self._clock()
        threading.Thread(target=self._watch, name="absent-sites", daemon=True).start()

    def send(self, task: Task) -> None:
        with self._cond:
            slot = self._slots[task.site]
            if not slot.absent:
                slot.queue.append(task)
                self._cond.notify_all()
                return
        self._fail(
            task, f"the site declined the job: {slot.declined}" if slot.declined else "the site is not connected"
        )

    def cancel(self, task_ids: set[str]) -> None:
        with self._cond:
            for slot in self._slots.values():
                slot.queue = deque(task for task in slot.queue if task.id not in task_ids)
                if slot.running is not None and slot.running.id in task_ids:
                    slot.running = None  # its late result is ignored
            self._cond.notify_all()

    def close(self, timeout_s: float = 60.0) -> None:
        """Tell every site the job is over and wait (at most ``timeout_s``) until the present ones said goodbye
        (they deliver their last events first)."""
        deadline = self._clock() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while any(s.present and not s.left for s in self._slots.values()):
                remaining = deadline - self._clock()
                if remaining <= 0:
                    late = [s.name for s in self._slots.values() if s.present and not s.left]
                    log.warning("sites %s did not finish within %g s", ", ".join(late), timeout_s)
                    break
                self._cond.wait(min(remaining, 1.0))
        self._stopped.set()

    def terminate(self) -> None:
        """Stop answering without ending the job for the sites: they wait for this server to come back (a
        restarted server resumes the job)."""
        with self._cond:
            self._terminated = True
            self._cond.notify_all()
        self._stopped.set()

    # -- what the sites call (from the service's threads) -----------------------------------------------------------
    def join(self, site: str, instance: str) -> None:
        """``site``'s process ``instance`` is set up; a new instance replaces the previous one (a restarted
        process), and gets the task that one was running, once. An instance that was replaced and joins again
        means two live processes of the site: what they run fails, with that reason."""
        interrupted: Task | None = None
        again = warn = False
        with self._cond:
            slot = self._slot(site)
            if slot.instance and slot.instance != instance:
                if instance in slot.replaced and not slot.doubled:
                    slot.doubled = (
                        f"{site} runs in two processes at once (instances {slot.instance} and {instance}): its kit "
                        "is started twice, on this machine or another; stop one"
                    )
                    warn = True
                slot.replaced.add(slot.instance)
                interrupted, slot.running = slot.running, None
                if interrupted is not None and not slot.doubled and interrupted.id not in slot.resent:
                    slot.resent.add(interrupted.id)  # the new process runs it, once: a killed client costs nothing
                    slot.queue.appendleft(interrupted)
                    again = True
            rejoined = slot.instance != instance or not slot.present
            slot.instance, slot.present, slot.absent, slot.left, slot.declined = instance, True, False, False, ""
            slot.seen = self._clock()
            self._cond.notify_all()
            doubled = slot.doubled
        if warn:
            log.error("%s", doubled)
        if interrupted is not None and again:
            log.warning("%s restarted while running task %s; it is sent again", site, interrupted.id)
        elif interrupted is not None:
            self._fail(
                interrupted, doubled or "the site's process restarted while running it, also when it was sent again"
            )
        if rejoined:
            log.info("%s joined (instance %s)", site, instance)
            self._endpoint_().site_joined(site)

    def poll(self, site: str, instance: str, have: str, wait_s: float) -> Message | None:
        """The next message for ``site``: its running task (if the site does not have it yet), its next task,
        or :class:`Shutdown` at the job's end; ``None`` if nothing came within ``wait_s``."""
        deadline = self._clock() + wait_s
        with self._cond:
            slot = self._check(site, instance)
            while True:
                slot.seen = self._clock()
                if slot.running is not None and slot.running.id != have:
                    return slot.running
                if slot.running is None and slot.queue:
                    task = slot.running = slot.queue.popleft()
                    break
                if self._closing:
                    return Shutdown("job finished")
                remaining = deadline - self._clock()
                if remaining <= 0 or self._terminated:
                    return None
                self._cond.wait(min(remaining, 1.0))
                self._check(site, instance)
        self._endpoint_().task_started(task.id)
        return task

    def receive(self, site: str, instance: str, message: Message) -> EventAck | None:
        """A result or an event batch from ``site``; an event batch is answered with its acknowledgement."""
        if isinstance(message, Result):
            if message.site != site:
                raise Refused(f"{site} sent a result naming {message.site!r}")
            with self._cond:
                slot = self._check(site, instance)
                slot.seen = self._clock()
                if slot.running is None or slot.running.id != message.task_id:
                    log.info("%s: result for %s is not awaited (a resend or a given-up task)", site, message.task_id)
                    return None
                slot.running = None
                self._cond.notify_all()
            self._endpoint_().result_received(site, message)
            return None
        if isinstance(message, EventBatch):
            if message.site != site:
                raise Refused(f"{site} sent events naming {message.site!r}")
            with self._cond:
                self._check(site, instance).seen = self._clock()
            return EventAck(site, message.session, self._endpoint_().events_received(site, message))
        raise Refused(f"{site} sent a {type(message).__name__}, which sites do not send")

    def leave(self, site: str, instance: str) -> None:
        """``site`` delivered its last events and stops; tasks it still had (it stopped early) fail."""
        with self._cond:
            slot = self._slots.get(site)
            if slot is None or slot.instance != instance:
                return
            tasks = slot.take_tasks()
            slot.left = slot.absent = True
            self._cond.notify_all()
        for task in tasks:
            self._fail(task, "the site stopped before it answered (see its log)")

    def decline(self, site: str, reason: str) -> None:
        """``site`` will not take part: its tasks fail with ``reason``, now and later."""
        with self._cond:
            slot = self._slot(site)
            tasks = slot.take_tasks()
            slot.absent = slot.left = True
            was_present, slot.present = slot.present, False
            slot.declined = reason
            self._cond.notify_all()
        for task in tasks:
            self._fail(task, f"the site declined the job: {reason}")
        if was_present:
            self._endpoint_().site_left(site, f"declined the job: {reason}")

    def finished(self, site: str) -> bool:
        """``site`` said goodbye: it has nothing more to do in this job."""
        with self._cond:
            slot = self._slots.get(site)
            return slot is not None and slot.left

    # -- inside ------------------------------------------------------------------------------------------------
    def _endpoint_(self) -> ServerEndpoint:
        assert self._endpoint is not None, "the link has not started"
        return self._endpoint

    def _slot(self, site: str) -> _Slot:
        slot = self._slots.get(site)
        if slot is None:
            raise Refused(f"{site} is not one of this job's sites ({', '.join(self._slots)})")
        return slot

    def _check(self, site: str, instance: str) -> _Slot:
        slot = self._slot(site)
        if slot.instance != instance or not slot.present:
            raise Rejoin(f"{site}: join the job first")
        return slot

    def _fail(self, task: Task, reason: str) -> None:
        failure = Failure(task.site, task.kind, reason)
        self._endpoint_().result_received(task.site, Result(task.id, task.site, failure=failure))

    def _watch(self) -> None:
        while not self._stopped.wait(1.0):
            self.mark_absent()

    def mark_absent(self) -> None:
        """Mark sites absent that stopped polling, or never came (the link's watcher calls it every second)."""
        now = self._clock()
        gone: list[tuple[_Slot, list[Task], str, bool]] = []
        with self._cond:
            for slot in self._slots.values():
                if slot.absent or slot.left:
                    continue
                if slot.present and now - slot.seen > self._absent_after_s:
                    reason = f"silent for {now - slot.seen:.0f} s"
                elif not slot.present and now - self._began > self._absent_after_s:
                    reason = f"did not connect within {self._absent_after_s:g} s"
                else:
                    continue
                tasks = slot.take_tasks()
                was_present, slot.present, slot.absent = slot.present, False, True
                gone.append((slot, tasks, reason, was_present))
                if not was_present:
                    log.warning("%s %s; its tasks fail until it connects", slot.name, reason)
        for slot, tasks, reason, was_present in gone:
            for task in tasks:
                self._fail(task, f"the site is absent ({reason})")
            if was_present:
                log.warning("%s is absent (%s)", slot.name, reason)
                self._endpoint_().site_left(slot.name, reason)
