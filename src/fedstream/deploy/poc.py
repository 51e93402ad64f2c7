"""``fedstream poc``: a real deployment on this machine, to try a job the way it will run across sites.

It provisions a federation into the workspace (a CA, a server, ``site-1..N``, an admin), starts the server
and one client per site as separate OS processes on 127.0.0.1 over mutual TLS, submits the job as the
admin, follows it, and stops every process it started, also on Ctrl-C::

    WS/kits/          the certificates (made anew for each run)
    WS/server/        the server's workspace: jobs/<job id>/ holds result.json, models, logs, tracking
    WS/site-N/        each client's workspace: jobs/<job id>/site-N/log.txt
    WS/*.out          each process's own output
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedstream.children import PARENT, sigterm_as_interrupt
from fedstream.config.loader import check_job_config
from fedstream.deploy.admin import Admin
from fedstream.deploy.kit import load_kit
from fedstream.deploy.provision import Project, ServerSpec, provision
from fedstream.errors import ConfigError
from fedstream.workspace import LOCK, RESULT, exclusive

ADMIN = "admin"
MARKER = ".fedstream-poc"
LOCAL_HOSTS = ["localhost", "127.0.0.1"]


def free_port() -> int:
    """A TCP port that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


SITE_MB = 400
"""Memory a site takes under poc before any data: its client (70 MB) and the site process it starts ahead,
which has PyTorch loaded (300 MB with the CPU build)."""


def poc_project(num_sites: int, port: int) -> Project:
    if num_sites < 1:
        raise ConfigError(f"the number of sites must be at least 1, got {num_sites}", key="-n")
    return Project(
        name="poc",
        server=ServerSpec(hosts=LOCAL_HOSTS, port=port),
        sites=[f"site-{i}" for i in range(1, num_sites + 1)],
        admins=[ADMIN],
    )


class LocalFederation:
    """A server and its clients as processes on this machine, and an admin connection to the server."""

    def __init__(self, workspace: Path, commands: dict[str, list[str]], environment: dict[str, str]) -> None:
        self.workspace = workspace
        self._commands = commands
        self._environment = environment
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.admin = Admin(load_kit(workspace / "kits" / ADMIN, "admin"))
        for name in commands:
            self._start(name)

    def _start(self, name: str) -> None:
        env = {**os.environ, PARENT: str(os.getpid()), **(self._environment if name != "server" else {})}
        with open(self.workspace / f"{name}.out", "ab") as out:
            command = self._commands[name]
            self.processes[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def restart(self, name: str, how: signal.Signals = signal.SIGTERM) -> None:
        """Stop process ``name`` (``server`` or a site) with ``how`` (SIGKILL: no clean-up at all), unless it
        has ended already, and start it again with the same kit and workspace."""
        process = self.processes[name]
        if process.poll() is None:
            process.send_signal(how)
        process.wait()
        self._start(name)

    def stop(self) -> None:
        """Clients first, then the server: SIGTERM, then SIGKILL for any still running after 15 s."""
        self.admin.close()
        names = [name for name in self.processes if name != "server"] + ["server"]
        for name in names:
            if self.processes[name].poll() is None:
                self.processes[name].terminate()
        for name in names:
            try:
                self.processes[name].wait(15)
            except subprocess.TimeoutExpired:
                self.processes[name].kill()
                self.processes[name].wait()


@contextlib.contextmanager
def federation(
    workspace: Path,
    num_sites: int,
    *,
    threads: int = 0,
    absent_after_s: float = 30.0,
    max_message_mb: float | None = None,
    load_timeout_s: float | None = None,
    adjust: Callable[[Path], None] | None = None,
    environment: dict[str, str] | None = None,
) -> Iterator[LocalFederation]:
    """Provision, start the server and the clients, and yield them once the server answers; stop them all
    after. ``adjust`` may change the kits (in the folder it is given) before anything starts;
    ``environment`` is added to the clients' (``https_proxy``, say)."""
    project = poc_project(num_sites, free_port())
    _check_memory(num_sites)
    with exclusive(workspace, "fedstream poc"):
        _claim(workspace)
        kits = workspace / "kits"
        shutil.rmtree(kits, ignore_errors=True)
        provision(project, kits)
        if adjust is not None:
            adjust(kits)
        python = [sys.executable, "-m", "fedstream"]
        listen = f"127.0.0.1:{project.server.port}"
        per_site = threads or max(1, (os.cpu_count() or 1) // num_sites)
        commands = {"server": [*python, "server", "start", str(kits / "server"), "-w", str(workspace / "server")]}
        commands["server"] += ["--listen", listen, "--absent-after", str(absent_after_s)]
        if max_message_mb is not None:
            commands["server"] += ["--max-message-mb", str(max_message_mb)]
        if load_timeout_s is not None:
            commands["server"] += ["--load-timeout", str(load_timeout_s)]
        for site in project.sites:
            commands[site] = [*python, "client", "start", str(kits / site), "-w", str(workspace / site)]
            commands[site] += ["--threads", str(per_site)]
        with sigterm_as_interrupt():  # SIGTERM stops the processes too, like Ctrl-C
            local = LocalFederation(workspace, commands, environment or {})
            try:
                local.admin.wait_ready(60)
                yield local
            finally:
                local.stop()


def _check_memory(num_sites: int) -> None:
    """Refuse a number of sites whose processes could not fit in this machine's available memory."""
    available = available_mb()
    needed = num_sites * SITE_MB
    if available is not None and needed > available:
        raise ConfigError(
            f"{num_sites} sites need about {needed / 1024:,.0f} GB under poc (a client and a site process each, "
            f"{SITE_MB} MB before any data), and this machine has {available / 1024:,.1f} GB available; run fewer "
            f"sites, or run many on a few processes with fedstream simulate -n {num_sites} -t T",
            key="-n",
        )


def available_mb() -> float | None:
    """The memory the kernel says new processes can use (MemAvailable), in MB; ``None`` where it does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _claim(workspace: Path) -> None:
    """Use ``workspace`` if it is new, empty, or made by poc before (its kits are made anew)."""
    marker = workspace / MARKER
    if not marker.exists() and any(entry.name != LOCK for entry in workspace.iterdir()):
        raise ConfigError(
            f"{workspace} is not empty and was not made by fedstream poc; use a new or empty folder", key="-w"
        )
    marker.touch()


def run_poc(
    job_dir: str | Path,
    workspace: str | Path,
    num_sites: int,
    overrides: list[str],
    show: Callable[[dict[str, Any]], None],
    *,
    threads: int = 0,
) -> dict[str, Any]:
    """Run ``job_dir`` on a local deployment of ``num_sites`` sites; returns the job's final status. Interrupted
    (Ctrl-C or SIGTERM) while the job runs, it stops every process and returns the job's status as the stopped
    server left it (``exit_code`` 130)."""
    check_job_config(job_dir, overrides)  # at once: before the kits, the processes and their seconds
    sites = [f"site-{i}" for i in range(1, num_sites + 1)]
    with federation(Path(workspace), num_sites, threads=threads) as local:
        job_id = local.admin.submit(job_dir, overrides, sites)
        try:
            return local.admin.follow(job_id, show)
        except KeyboardInterrupt:
            pass
    result = Path(workspace) / "server" / "jobs" / job_id / RESULT  # the server wrote it as it stopped
    outcome = json.loads(result.read_text()) if result.is_file() else None
    stopped = "stopped by Ctrl-C or SIGTERM before the server wrote its result.json"
    return {"id": job_id, "state": "interrupted", "error": stopped, "exit_code": 130, "result": outcome}
