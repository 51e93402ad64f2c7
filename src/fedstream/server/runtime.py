"""Host one job on the server, over any link: workflow, federation, receivers, models and ``result.json``.

:func:`build` makes the job's server components (and checks them against the sites) before anything is
started; :class:`ServerRuntime` runs them. The simulator composes it with its pipe link; a deployed server
with its network link. Whatever happens (a failure, Ctrl-C, SIGTERM), ``result.json`` says how the job
ended and the receivers close their runs; a second interrupt only shortens the wait for the receivers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import resource
import secrets
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any, ClassVar

from fedstream.config import Job
from fedstream.errors import ConfigError, FedstreamError
from fedstream.events import EventBus
from fedstream.link import ServerLink
from fedstream.messages import Weights
from fedstream.server.federation import Federation, SiteJoined, SiteLeft
from fedstream.server.journal import EventJournal
from fedstream.server.models import ModelStore
from fedstream.server.receiver import JobInfo, JobOutcome, Receiver
from fedstream.server.receiver_host import ReceiverHost
from fedstream.workflows.base import RoundCompleted, RoundStarted, RoundSummary, Workflow
from fedstream.workflows.cross_site import CrossSiteEvaluated
from fedstream.workspace import LOG, Workspace

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TRACKING_INCOMPLETE = 3
EXIT_INTERRUPTED = 130
ROUNDS = "rounds.json"  # the completed rounds so far, for a job resumed after a server restart
EVENTS = "events.jsonl"  # the receivers' events until written, for a job resumed after a server restart


@dataclass(frozen=True)
class ServerComponents:
    """The job's server side, built and checked: its workflow and its receivers by name."""

    workflow: Workflow
    receivers: dict[str, Receiver]


@dataclass(frozen=True)
class RunResult:
    """The content of ``result.json`` and the process exit code it implies."""

    data: dict[str, Any]
    exit_code: int
    workspace: Workspace


@dataclass(frozen=True)
class JobFinished:
    """The job ended; ``result`` is what ``result.json`` holds."""

    name: ClassVar[str] = "job_finished"
    result: dict[str, Any]


def build(job: Job, sites: Sequence[str]) -> ServerComponents:
    """Build the workflow and receivers of ``job`` and check the workflow against ``sites``."""
    component = job.component("server.workflow")
    workflow = component.build(Workflow)
    try:
        workflow.check(sites)
    except ConfigError as exc:
        raise component.locate(exc) from exc
    receivers = {
        name: job.component(f"server.receivers.{name}").build(Receiver) for name in job.config.server.receivers
    }
    return ServerComponents(workflow, receivers)


def new_job_id() -> str:
    """A job id that sorts by start time and does not collide: ``20261128-173012-3f2a9c``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def initial_weights(job: Job) -> Weights:
    """The job's model, built with the job's seed, as numpy arrays."""
    import torch

    torch.manual_seed(job.config.seed)
    model = job.component("model").build(torch.nn.Module)
    return {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}


class ServerRuntime:
    """Runs one job's server side over a link.

    Args:
        job: the validated job.
        components: its server components (:func:`build`).
        workspace: where outputs go.
        sites: the job's sites.
        job_id: the job's unique id.
        bus: the server's event bus; the caller may subscribe to it first (a progress view).
        details: extra ``result.json`` entries of the composition (the simulator's worker count).
        journal_events: keep the sites' events and the completed rounds in ``server/events.jsonl`` until the
            receivers wrote them, so that a killed server loses none (:mod:`fedstream.server.journal`); a
            deployed server does.
    """

    def __init__(
        self,
        job: Job,
        components: ServerComponents,
        workspace: Workspace,
        sites: Sequence[str],
        *,
        job_id: str,
        bus: EventBus | None = None,
        details: Callable[[], dict[str, Any]] | None = None,
        journal_events: bool = False,
    ) -> None:
        self.job = job
        self.components = components
        self.workspace = workspace
        self.sites = list(sites)
        self.job_id = job_id
        self.bus = bus or EventBus()
        self._details = details
        self._journal_events = journal_events
        self._rounds: list[dict[str, Any]] = []
        self._membership: list[dict[str, Any]] = []
        self._cross_site: dict[str, Any] | None = None
        self._round = 0
        self._finishing = False
        self._signal = 0
        self._hosts: list[ReceiverHost] = []
        self._federation: Federation | None = None
        self._aborted = ""  # why, if abort() came before the federation was made
        self._abort_lock = threading.Lock()

    def run(self, link: ServerLink, *, began: float | None = None) -> RunResult:
        """Run the job over ``link`` and write ``result.json``; never raises for a job that went wrong.

        ``began`` (``time.monotonic()``) is when the composition started its work, for the timings.
        """
        began = time.monotonic() if began is None else began
        self._subscribe()
        hosts = {name: ReceiverHost(name, receiver) for name, receiver in self.components.receivers.items()}
        self._hosts = list(hosts.values())
        journal = taken = None
        if self._journal_events:
            journal = EventJournal(self.workspace.server / EVENTS, lambda: _oldest_unwritten(hosts.values()))
            taken = journal.open()
        federation = Federation(self.sites, self.bus, journal)
        with self._abort_lock:
            self._federation, aborted = federation, self._aborted
        if aborted:
            federation.abort(aborted)  # its first dispatch fails with the reason
        models = ModelStore(self.workspace.models)
        resumed_after = models.last_round()
        if resumed_after:  # the server restarted in the middle of this job: its earlier rounds count
            rounds = json.loads((self.workspace.server / ROUNDS).read_text())
            self._rounds = [entry for entry in rounds if entry["round"] <= resumed_after]
        started: list[ReceiverHost] = []
        status, error, exit_code = "completed", "", EXIT_OK
        startup_s = 0.0
        with self._signals():
            try:
                info = JobInfo(
                    self.job.name,
                    self.job_id,
                    self.job.config.description,
                    tuple(self.sites),
                    self.workspace.server,
                    self.job.to_dict(),
                )
                for name, host in hosts.items():
                    host.start(info, federation.abort, functools.partial(journal.mark, name) if journal else None)
                    started.append(host)
                    for event_name in host.events:
                        if not (journal and event_name == RoundCompleted.name):  # journaled: see below
                            self.bus.subscribe(event_name, host.handle)
                    log.info("receiver %s listens to %s", name, ", ".join(host.events))
                    for event in taken.unwritten(name, host.events) if taken else ():
                        host.handle(event)  # what it had not written before the server restarted
                if journal is not None:
                    self._journal_rounds(
                        journal, [host for host in hosts.values() if RoundCompleted.name in host.events]
                    )
                federation.start(link)
                startup_s = time.monotonic() - began
                # built here and handed over: no reference stays here, so each round frees the model before it
                self.components.workflow.run(federation, models, initial_weights(self.job))
                models.wait()  # the last model it saved is written
                link.close()
            except KeyboardInterrupt:
                how = "SIGTERM" if self._signal == signal.SIGTERM else "Ctrl-C"
                status, error, exit_code = "failed", f"interrupted ({how})", EXIT_INTERRUPTED
                log.warning("interrupted (%s); stopping the sites", how)
                link.terminate()
            except FedstreamError as exc:
                status, error, exit_code = "failed", str(exc), EXIT_FAILED
                log.error("job failed: %s", exc)
                link.close()
            except Exception as exc:
                status, error, exit_code = "failed", f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILED
                log.error("job failed with an internal error:\n%s", traceback.format_exc())
                link.terminate()
            self._finishing = True
            outcome = JobOutcome("interrupted" if self._signal else status, error, dict(models.paths))
            tracking: dict[str, Any] = {
                "events": {
                    "received": dict(federation.inbox.received),
                    "duplicates": dict(federation.inbox.duplicates),
                    "repeats": dict(federation.inbox.repeats),
                }
            }
            for name, host in hosts.items():
                if host in started:
                    if host.pending:
                        why = f" ({host.unavailable})" if host.unavailable else ""
                        noticeable = host.unavailable or host.pending > 10_000  # seconds of writing, or an outage
                        log.log(
                            logging.WARNING if noticeable else logging.INFO,
                            "waiting for %s to write %d events%s, at most %g s; Ctrl-C stops waiting",
                            name,
                            host.pending,
                            why,
                            host.receiver.stop_timeout_s,
                        )
                    host.stop(outcome)
                report = host.report()
                tracking[name] = {
                    "received": report.received,
                    "written": report.written,
                    "dropped": report.dropped,
                    "errors": report.errors,
                    **report.details,
                }
                if status == "completed" and (report.errors or report.dropped):
                    exit_code = EXIT_TRACKING_INCOMPLETE
            if self.bus.errors:
                tracking["handler_errors"] = self.bus.errors
                if status == "completed":
                    exit_code = EXIT_TRACKING_INCOMPLETE
            if journal is not None and exit_code != EXIT_INTERRUPTED:  # an interrupted job resumes: kept
                journal.close()
            data = self._result(status, error, models, tracking, began, startup_s)
            if resumed_after:
                data["resumed_after_round"] = resumed_after
            self.workspace.write_result(data)
        self.bus.fire(JobFinished(data))
        log.info("job %s %s in %.1f s", self.job.name, status, data["timing"]["total_s"])
        return RunResult(data, exit_code, self.workspace)

    def _journal_rounds(self, journal: EventJournal, hosts: list[ReceiverHost]) -> None:
        """Give ``hosts`` each completed round through ``journal``, as the inbox gives them the sites' events."""

        def journaled(event: RoundCompleted) -> None:
            def hand_over(at: int) -> None:
                positioned = dataclasses.replace(event, position=at)
                for host in hosts:
                    host.handle(positioned)

            journal.append_round(event.summary, hand_over)

        if hosts:
            self.bus.subscribe(RoundCompleted, journaled)

    def abort(self, reason: str) -> None:
        """Make the job fail with ``reason`` (from another thread), also before :meth:`run` began."""
        with self._abort_lock:
            self._aborted, federation = self._aborted or reason, self._federation
        if federation is not None:
            federation.abort(reason)

    def _subscribe(self) -> None:
        def round_started(event: RoundStarted) -> None:
            self._round = event.round

        def left(event: SiteLeft) -> None:
            self._membership.append({"round": self._round, "site": event.site, "left": event.reason})

        def joined(event: SiteJoined) -> None:
            if any(entry["site"] == event.site for entry in self._membership):
                self._membership.append({"round": self._round, "site": event.site, "rejoined": True})

        self.bus.subscribe(RoundStarted, round_started)

        def completed(event: RoundCompleted) -> None:
            self._rounds.append(_round(event.summary))
            partial = self.workspace.server / (ROUNDS + ".partial")
            partial.write_text(json.dumps(self._rounds))
            os.replace(partial, self.workspace.server / ROUNDS)

        self.bus.subscribe(RoundCompleted, completed)

        def cross_site(event: CrossSiteEvaluated) -> None:
            self._cross_site = asdict(event.matrix)

        self.bus.subscribe(CrossSiteEvaluated, cross_site)
        self.bus.subscribe(SiteLeft, left)
        self.bus.subscribe(SiteJoined, joined)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM interrupt the job once. During the wind-down, Ctrl-C (SIGINT) stops the wait for
        the receivers; SIGTERM, a request to stop cleanly, does not: asking again changes nothing (a poc that dies
        sends its server SIGTERM once for each of its threads as they end)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def interrupt(number: int, frame: FrameType | None) -> None:
            first = not self._signal
            self._signal = self._signal or number
            if self._finishing and number == signal.SIGINT:
                log.warning("interrupted again: not waiting for the tracking backends any longer")
                for host in self._hosts:
                    host.hurry()
            elif self._finishing:
                log.info("SIGTERM: still waiting for the tracking backends, as it ends (Ctrl-C stops waiting)")
            elif first:
                raise KeyboardInterrupt

        previous = {number: signal.signal(number, interrupt) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def _result(
        self,
        status: str,
        error: str,
        models: ModelStore,
        tracking: dict[str, Any],
        began: float,
        startup_s: float,
    ) -> dict[str, Any]:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        ws = self.workspace
        return {
            "job": self.job.name,
            "job_id": self.job_id,
            "status": status,
            "error": error or None,
            "clients": self.sites,
            **(self._details() if self._details else {}),
            "rounds": self._rounds,
            "membership": self._membership,
            **({"cross_site_eval": self._cross_site} if self._cross_site is not None else {}),
            "models": {name: str(path) for name, path in models.paths.items()},
            "timing": {
                "total_s": round(time.monotonic() - began, 3),
                "startup_s": round(startup_s, 3),
                "server_cpu_s": round(own.ru_utime + own.ru_stime, 3),
                "workers_cpu_s": round(children.ru_utime + children.ru_stime, 3),
            },
            "tracking": tracking,
            "logs": {
                "combined": str(ws.log),
                "server": str(ws.server / LOG),
                # sites' own logs where this workspace has them (the simulator's; deployed sites keep theirs)
                **{site: str(ws.site(site) / LOG) for site in self.sites if (ws.site(site) / LOG).is_file()},
            },
        }


def _oldest_unwritten(hosts: Iterable[ReceiverHost]) -> int | None:
    """The journal position of the oldest event that a receiver has still to write."""
    return min((position for host in hosts if (position := host.oldest_unwritten) is not None), default=None)


def _round(summary: RoundSummary) -> dict[str, Any]:
    data = asdict(summary)
    data["duration_s"] = round(summary.duration_s, 3)
    return data
