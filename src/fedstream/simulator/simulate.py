"""Run a job with all its sites on this machine: the server here, the sites in ``threads`` worker processes.

Everything that can be checked is checked before a worker starts: the config, the workflow against the
number of sites, the trainer's and receivers' constructors. Then the workers start, the receivers check their
backends, and the workflow runs. Whatever happens, ``result.json`` says how it ended.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fedstream import logs
from fedstream.config import Job
from fedstream.errors import ConfigError, FedstreamError
from fedstream.events import JOB_FINISHED, ROUND_COMPLETED, Event, EventBus
from fedstream.pt.trainer import Trainer
from fedstream.server.federation import Federation
from fedstream.server.models import ModelStore
from fedstream.server.receiver import JobInfo, JobOutcome, Receiver
from fedstream.simulator.link import SimulatorLink
from fedstream.simulator.worker import WorkerSpec
from fedstream.workflows.base import RoundSummary, Workflow
from fedstream.workspace import Workspace, check_site_names

log = logging.getLogger(__name__)

# Exit codes of a run.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_TRACKING_INCOMPLETE = 3
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class RunResult:
    """The content of ``result.json`` and the process exit code it implies."""

    data: dict[str, Any]
    exit_code: int
    workspace: Workspace


def site_names(count: int | None = None, names: Sequence[str] | None = None) -> list[str]:
    """``site-1..site-N`` for a count, or the given names checked for uniqueness and spelling."""
    if names is not None:
        try:
            return check_site_names([name.strip() for name in names])
        except ValueError as exc:
            raise ConfigError(str(exc), key="-c") from None
    if count is None or count < 1:
        raise ConfigError(f"the number of clients must be at least 1, got {count}", key="-n")
    return [f"site-{i}" for i in range(1, count + 1)]


def new_job_id() -> str:
    """A job id that sorts by start time and does not collide: ``20261128-173012-3f2a9c``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def check(job: Job, sites: Sequence[str], threads: int) -> tuple[Workflow, dict[str, Receiver]]:
    """Build the server's components and the trainer once, and check them against ``sites`` and ``threads``."""
    if threads < 1:
        raise ConfigError(f"the number of parallel clients must be at least 1, got {threads}", key="-t")
    workflow_component = job.component("server.workflow")
    workflow = workflow_component.build(Workflow)
    try:
        workflow.check(sites)
    except ConfigError as exc:
        raise exc.located(file=job.source, prefix="server.workflow.args") from exc
    job.component("client.trainer").build(Trainer)
    receivers = {
        name: job.component(f"server.receivers.{name}").build(Receiver) for name in job.config.server.receivers
    }
    return workflow, receivers


def simulate(
    job: Job,
    workspace: str | os.PathLike[str],
    sites: Sequence[str],
    threads: int,
    *,
    observe: Callable[[EventBus], None] | None = None,
    console: logging.Handler | None = None,
    verbose: bool = False,
) -> RunResult:
    """Run ``job`` with ``sites`` on at most ``threads`` worker processes; returns what ``result.json`` holds.

    Configuration problems raise :class:`ConfigError` before anything is written; everything later ends in
    a :class:`RunResult` (``status`` ``completed`` or ``failed``).
    """
    began = time.monotonic()
    workflow, receivers = check(job, sites, threads)
    ws = Workspace.prepare(workspace, sites)
    (ws.server / "job.toml").write_text(job.to_toml())
    logs.setup_server(ws.root, console)
    job_id = new_job_id()
    workers = min(threads, len(sites))
    log.info("job %s (%s): %d sites on %d workers, workspace %s", job.name, job_id, len(sites), workers, ws.root)

    config = job.to_dict()
    torch_threads = max(1, (os.cpu_count() or 1) // workers)
    specs = [
        WorkerSpec(
            index=w,
            job_dir=str(job.dir),
            job_source=job.source,
            config=config,
            job_id=job_id,
            sites={site: i for i, site in enumerate(sites) if i % workers == w},
            num_sites=len(sites),
            workspace=str(ws.root),
            torch_threads=torch_threads,
            verbose=verbose,
        )
        for w in range(workers)
    ]
    torch.set_num_threads(1)
    link = SimulatorLink(specs)

    bus = EventBus()
    rounds: list[RoundSummary] = []
    bus.subscribe(ROUND_COMPLETED, lambda event: rounds.append(event.data))
    if observe is not None:
        observe(bus)
    federation = Federation(sites, bus, ModelStore(ws.models))
    link.connect(federation)
    federation.connect(link)

    status, error, exit_code = "completed", "", EXIT_OK
    started: list[Receiver] = []
    startup_s = 0.0
    try:
        torch.manual_seed(job.config.seed)
        model = job.component("model").build(torch.nn.Module)
        weights = {name: tensor.detach().cpu().numpy() for name, tensor in model.state_dict().items()}
        info = JobInfo(job.name, job_id, job.config.description, tuple(sites), ws.server, config)
        for name, receiver in receivers.items():
            receiver.start(info)
            started.append(receiver)
            for event_name in receiver.events:
                bus.subscribe(event_name, receiver.handle)
            log.info("receiver %s listens to %s", name, ", ".join(receiver.events))
        startup_s = time.monotonic() - began
        workflow.run(federation, weights)
        link.close()
    except KeyboardInterrupt:
        status, error, exit_code = "failed", "interrupted (Ctrl-C)", EXIT_INTERRUPTED
        log.warning("interrupted; stopping the workers")
        link.terminate()
    except FedstreamError as exc:
        status, error, exit_code = "failed", str(exc), EXIT_FAILED
        log.error("job failed: %s", exc)
        link.close()
    except Exception as exc:
        status, error, exit_code = "failed", f"internal error: {type(exc).__name__}: {exc}", EXIT_FAILED
        log.error("job failed with an internal error:\n%s", traceback.format_exc())
        link.terminate()

    models = dict(federation.models.paths)
    outcome = JobOutcome(status, error, models)
    tracking: dict[str, Any] = {"events": _event_counts(federation)}
    for name, receiver in receivers.items():
        errors = []
        if receiver in started:
            try:
                receiver.stop(outcome)
            except Exception as exc:  # a receiver's failure is reported, never hides the job's own result
                log.exception("receiver %s failed to stop", name)
                errors.append(f"stop failed: {exc!r}")
        report = receiver.report()
        errors = report.errors + errors
        tracking[name] = {
            "received": report.received,
            "written": report.written,
            "dropped": report.dropped,
            "errors": errors,
            **report.details,
        }
        if status == "completed" and (errors or report.dropped):
            exit_code = EXIT_TRACKING_INCOMPLETE
    if bus.errors:
        tracking["handler_errors"] = bus.errors
        if status == "completed":
            exit_code = EXIT_TRACKING_INCOMPLETE

    data: dict[str, Any] = {
        "job": job.name,
        "job_id": job_id,
        "status": status,
        "error": error or None,
        "clients": list(sites),
        "threads": workers,
        "restarts": link.restarts,
        "rounds": [_round(summary) for summary in rounds],
        "models": {name: str(path) for name, path in models.items()},
        "timing": {"total_s": round(time.monotonic() - began, 3), "startup_s": round(startup_s, 3), **_cpu_times()},
        "tracking": tracking,
        "logs": {
            "combined": str(ws.log),
            "server": str(ws.server / logs.LOG_FILE),
            **{site: str(ws.site(site) / logs.LOG_FILE) for site in sites},
        },
    }
    ws.write_result(data)
    bus.fire(Event(JOB_FINISHED, data))
    log.info("job %s %s in %.1f s", job.name, status, data["timing"]["total_s"])
    return RunResult(data, exit_code, ws)


def _round(summary: RoundSummary) -> dict[str, Any]:
    data = asdict(summary)
    data["duration_s"] = round(summary.duration_s, 3)
    return data


def _cpu_times() -> dict[str, float]:
    """CPU seconds (user + system) of the server process and of the workers it has reaped."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "server_cpu_s": round(own.ru_utime + own.ru_stime, 3),
        "workers_cpu_s": round(workers.ru_utime + workers.ru_stime, 3),
    }


def _event_counts(federation: Federation) -> dict[str, Any]:
    inbox = federation.inbox
    return {"received": dict(inbox.received), "duplicates": dict(inbox.duplicates)}
