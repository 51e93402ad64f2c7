"""One site at work: run its tasks with its executor, forward its events, never let its code take the
process down.

A failing task (an exception, or ``sys.exit`` in the site's code) is logged with its traceback in the site's
log and answered with a :class:`~fedstream.messages.Failure` naming what the site was doing and why. Before
a result leaves, the events the task produced have been acknowledged by the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from fedstream.config.schema import ForwardConfig
from fedstream.messages import TASK_STARTED, EventBatch, Failure, Result, Task, WireEvent
from fedstream.site.context import SiteContext, register, restore, run_as, set_running
from fedstream.site.executor import Executor, TaskOutput
from fedstream.site.outbox import Forwarder, Outbox
from fedstream.wire import sendable

SETUP = "setup"
OUTBOX_JOURNAL = "outbox.jsonl"


class Site:
    """A site's context, event outbox and executor.

    Args:
        context: who the site is; its bus carries the events that ``forward`` names to the outbox.
        executor: runs the site's tasks; set up before the first one.
        send_events: where the outbox sends batches (the host's link).
        forward: the local event names to ship to the server, and the prefix they get there.
        stall_timeout_s: after a task, how long to wait for the server to acknowledge more events before
            sending the result anyway (the wait goes on as long as acknowledgements arrive).
        journal_events: keep the outgoing events on disk too (``outbox.jsonl`` in the site's workspace), so that
            a next process of the site delivers those that a killed one could not (deployed sites); and start
            each task's events with a :data:`~fedstream.messages.TASK_STARTED` marker, by which the server keeps
            that next process, which runs the killed one's task again, from logging the same steps twice.
    """

    def __init__(
        self,
        context: SiteContext,
        executor: Executor,
        send_events: Callable[[EventBatch], None],
        forward: ForwardConfig,
        *,
        stall_timeout_s: float = 60.0,
        journal_events: bool = False,
    ) -> None:
        self.context = context
        journal = context.workspace / OUTBOX_JOURNAL if journal_events else None
        self.outbox = Outbox(context.name, send_events, journal=journal)
        self._mark_tasks = journal_events  # a next process of the site runs the task it was killed in again
        Forwarder(context.bus, self.outbox, forward.events, forward.prefix)
        self._executor = executor
        self._ready = False
        self._stall_timeout_s = stall_timeout_s
        register(context)

    def handle(self, task: Task) -> Result:
        """Run ``task``; a failure is in the result, never raised."""
        if self._mark_tasks:  # what the task logs follows it
            self.outbox.put(WireEvent(TASK_STARTED, {"task": task.id}))
        token = run_as(self.context)
        set_running(self.context)
        phase = task.kind
        try:
            if not self._ready:
                phase = SETUP
                self._executor.setup(self.context)
                self._ready, phase = True, task.kind
            output = self._executor.execute(task)
            _check_sendable(output)
            result = Result(
                task.id, self.context.name, output.num_samples, output.metrics, output.weights, output.extra
            )
        except (Exception, SystemExit) as exc:
            self.context.log.exception("%s in round %d failed", phase, task.round)
            result = Result(task.id, self.context.name, failure=Failure(self.context.name, phase, _describe(exc)))
        finally:
            try:
                self._executor.release()
            finally:
                set_running(None)
                restore(token)
        if not self.outbox.flush(self._stall_timeout_s):
            self.context.log.warning(
                "the server acknowledged none of %d waiting events for %g s; the result goes ahead of them",
                self.outbox.unacknowledged,
                self._stall_timeout_s,
            )
        return result

    def close(self) -> int:
        """End the executor, deliver the remaining events and refuse new ones; returns how many events could not
        be delivered."""
        try:
            with _as(self.context):
                self._executor.close()
        except Exception:
            self.context.log.exception("closing the site's executor failed")
        self.context.close()
        return self.outbox.close(self._stall_timeout_s)


def _check_sendable(output: TaskOutput) -> None:
    """Raise unless every array of ``output`` can travel: found here, it fails the task; found while the
    result is encoded, it would take the site's process down."""
    groups = {"weights": output.weights, **{f"extra[{name!r}]": group for name, group in output.extra.items()}}
    for what, arrays in groups.items():
        for name, array in arrays.items():
            if not sendable(array.dtype):
                raise TypeError(f"{what}[{name!r}] has dtype {array.dtype}, which cannot be sent")


@contextlib.contextmanager
def _as(site: SiteContext) -> Iterator[None]:
    token = run_as(site)
    try:
        yield
    finally:
        restore(token)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"the site's code called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"
