"""Run a job with all its sites on this machine: the server runtime here, site hosts in worker processes.

Everything that can be checked is checked before a worker starts: the config, the site names, the workflow
against the number of sites, the trainer's and receivers' constructors.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedstream import logs
from fedstream.config import Job
from fedstream.errors import ConfigError
from fedstream.events import EventBus
from fedstream.pt.trainer import Trainer
from fedstream.server.runtime import RunResult, ServerComponents, ServerRuntime, build, new_job_id
from fedstream.simulator.link import SimulatorLink
from fedstream.simulator.worker import WorkerSpec
from fedstream.workspace import Workspace, check_site_names, exclusive

log = logging.getLogger(__name__)


def site_names(count: int | None = None, names: Sequence[str] | None = None) -> list[str]:
    """``site-1..site-N`` for a count, or the given names checked for safety and uniqueness."""
    if names is not None:
        try:
            return check_site_names([name.strip() for name in names])
        except ValueError as exc:
            raise ConfigError(str(exc), key="-c") from None
    if count is None or count < 1:
        raise ConfigError(f"the number of sites must be at least 1, got {count}", key="-n")
    return [f"site-{i}" for i in range(1, count + 1)]


def check(job: Job, sites: Sequence[str], threads: int) -> ServerComponents:
    """Build the server's components and the trainer (if the job has one) once, and check them against
    ``sites`` and ``threads``."""
    components = build(job, sites)
    if "client.trainer" in job.components:
        job.component("client.trainer").build(Trainer)
    if threads < 1:
        raise ConfigError(f"the number of sites running at once must be at least 1, got {threads}", key="-t")
    if threads > len(sites):
        raise ConfigError(
            f"{threads} sites at once is more than the job's {len(sites)} site(s); use -t {len(sites)} or less",
            key="-t",
        )
    return components


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
    """Run ``job`` with ``sites`` on ``threads`` worker processes; returns what ``result.json`` holds.

    Configuration problems raise :class:`ConfigError` before anything is written; everything later ends in
    a :class:`RunResult`.
    """
    began = time.monotonic()
    components = check(job, sites, threads)
    with exclusive(Path(workspace).expanduser().resolve(), "fedstream simulate"):  # one run at a time in it
        ws = Workspace.prepare(workspace, sites)
        (ws.server / "job.toml").write_text(job.to_toml())
        logs.setup_server(ws.root, console)
        job_id = new_job_id()
        log.info("job %s (%s): %d sites on %d workers, workspace %s", job.name, job_id, len(sites), threads, ws.root)
        import torch

        torch.set_num_threads(1)
        config = job.to_dict()
        specs = [
            WorkerSpec(
                index=w,
                job_dir=str(job.dir),
                job_source=job.source,
                config=config,
                job_id=job_id,
                sites={site: i for i, site in enumerate(sites) if i % threads == w},
                num_sites=len(sites),
                workspace=str(ws.root),
                torch_threads=max(1, (os.cpu_count() or 1) // threads),
                verbose=verbose,
            )
            for w in range(threads)
        ]
        bus = EventBus()
        if observe is not None:
            observe(bus)
        details: dict[str, Any] = {"threads": threads}
        runtime = ServerRuntime(job, components, ws, sites, job_id=job_id, bus=bus, details=lambda: details)
        return runtime.run(SimulatorLink(specs), began=began)
