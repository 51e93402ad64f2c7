"""``fedstream client start``: a site's long-running client, and the child process that runs one job.

The client connects out to the server (only outbound connections; ``https_proxy`` is honoured by gRPC),
asks for work, and runs each job's site code in a child process, so that a crashing trainer never takes the
client down: a child that dies is started again (the server fails the task it was running), at most
``MAX_STARTS`` times per job. The next child is started ahead, while the client waits for work (it imports
PyTorch then, not while a job trains), so a job starts on the site at once. It reconnects forever with
jittered backoff and says, once per change, why it cannot connect. Each job's files go to
``WS/jobs/<job id>/``: its code in ``code/``, the site's log in ``<site>/log.txt``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from fedstream import __version__, logs
from fedstream.children import PARENT
from fedstream.config import load_job
from fedstream.config.loader import parse_override
from fedstream.deploy import protocol
from fedstream.deploy.archive import job_folder_name, unpack_job
from fedstream.deploy.kit import KIT_FILE, Kit, load_kit
from fedstream.deploy.signing import JobRefused, Signature, verify_job
from fedstream.deploy.site_link import JOB, Backoff, GrpcSiteLink
from fedstream.errors import ConfigError
from fedstream.site.executor import Executor, Unusable
from fedstream.site.host import SiteHost
from fedstream.workspace import exclusive

log = logging.getLogger(__name__)

MAX_STARTS = 3
HEADER = "job.json"


def custom_code(archive: bytes) -> list[str]:
    """The Python files a job archive brings with it."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as members:
        return sorted(name for name in members.getnames() if name.endswith(".py"))


class Client:
    """A site's client: pulls jobs from the server and runs each in a child process."""

    def __init__(self, kit: Kit, workspace: Path, *, threads: int = 0) -> None:
        self.kit = kit
        self.root = workspace
        self.threads = threads or os.cpu_count() or 1
        self._stop = threading.Event()
        self._starts: dict[str, int] = {}
        self._spare: subprocess.Popen[bytes] | None = None

    def _child(self) -> subprocess.Popen[bytes]:
        """The child that will run the next job: started ahead, it waits for the job's folder on stdin."""
        spare, self._spare = self._spare, None
        if spare is None or spare.poll() is not None:
            command = [sys.executable, "-m", "fedstream.deploy.site_process", str(self.kit.folder)]
            env = {**os.environ, "FEDSTREAM_TORCH_THREADS": str(self.threads), PARENT: str(os.getpid())}
            spare = subprocess.Popen(command, env=env, stdin=subprocess.PIPE)
        return spare

    def serve(self) -> int:
        """Take jobs until interrupted; returns the exit code. Raises :class:`ConfigError` if another process
        uses the workspace."""
        with exclusive(self.root, f"the fedstream client of {self.kit.name}"):
            return self._serve()

    def _serve(self) -> int:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        console.setLevel(logging.INFO)
        logs.setup_server(self.root, console)
        log.info("fedstream %s client %s connects to %s", __version__, self.kit.name, self.kit.config.server)
        channel = protocol.channel(self.kit)
        next_job = channel.unary_stream(protocol.method("NextJob"))
        self._decline = channel.unary_unary(protocol.method("Decline"))
        backoff, problem = Backoff(channel), ""
        self._spare = self._child()
        try:
            while not self._stop.is_set():
                try:
                    pieces = list(next_job(protocol.to_json({"version": __version__}), timeout=60))
                except grpc.RpcError as exc:
                    explained = protocol.explain(exc, self.kit.config.server)
                    if explained != problem:
                        log.error("cannot get work from the server: %s; retrying", explained)
                        problem = explained
                    backoff.wait(self._stop, exc)
                    continue
                if problem:
                    log.info("connected to %s", self.kit.config.server)
                    problem = ""
                backoff.reset()
                if pieces:
                    self._run(protocol.from_json(pieces[0]), b"".join(pieces[1:]))
        except KeyboardInterrupt:
            log.info("interrupted; stopping")
        finally:
            channel.close()
            if self._spare is not None:
                self._spare.kill()
        return 130

    def _accept(self, header: dict[str, Any], archive: bytes) -> None:
        """Raise :class:`JobRefused` unless this site may run the job: signed by an admin of its federation,
        and without code of its own where the kit allows only installed components."""
        signature = Signature(str(header.get("signature", "")), str(header.get("certificate", "")))
        verify_job(self.kit.ca, archive, list(header.get("overrides", [])), signature)
        if not self.kit.config.allow_custom_code:
            files = custom_code(archive)
            if files:
                raise JobRefused(
                    f"this site runs only components installed on it (allow_custom_code = false in its kit.toml), "
                    f"and the job brings its own code: {', '.join(files[:5])}"
                )

    def _declined(self, job_id: str, reason: str) -> None:
        try:
            request = protocol.to_json({"reason": reason})
            self._decline(request, metadata=((JOB, job_id),), timeout=30)
        except grpc.RpcError as exc:
            log.warning("could not tell the server: %s", protocol.explain(exc, self.kit.config.server))
            self._stop.wait(5)

    def _run(self, header: dict[str, Any], archive: bytes) -> None:
        job_id = str(header["job_id"])
        starts = self._starts[job_id] = self._starts.get(job_id, 0) + 1
        folder = self.root / "jobs" / job_id
        code = folder / "code" / job_folder_name(header.get("folder"))
        try:
            if starts > MAX_STARTS:
                raise JobRefused(f"the site's process failed {MAX_STARTS} times (see {folder / 'log.txt'})")
            self._accept(header, archive)
            if not code.exists():
                unpack_job(archive, code)
        except (JobRefused, ConfigError) as exc:
            log.error("job %s (%s): not taking part: %s", header["name"], job_id, exc)
            self._declined(job_id, str(exc))
            return
        (folder / HEADER).write_text(json.dumps(header))
        log.info("job %s (%s): starting the site's process", header["name"], job_id)
        process = self._child()
        assert process.stdin is not None
        try:
            process.stdin.write(f"{folder}\n".encode())
            process.stdin.close()
        except OSError:
            pass  # it died while waiting: its exit code says so below
        try:
            code_ = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            process.wait(30)
            raise
        if code_:
            log.error("job %s: the site's process exited with code %d (see %s)", job_id, code_, folder / "log.txt")
        else:
            log.info("job %s: done", job_id)
        self._spare = self._child()


def site_main(kit_dir: str) -> None:
    """The child process (:mod:`fedstream.deploy.site_process`): once given a job's folder on stdin, host this
    kit's site in the job over gRPC until the server ends it."""
    import torch

    from fedstream.pt.executor import job_sites, preload

    preload()
    torch.set_num_threads(int(os.environ.get("FEDSTREAM_TORCH_THREADS", "1")))
    kit = load_kit(kit_dir, "site")
    folder_name = sys.stdin.readline().strip()
    if not folder_name:
        return  # the client stopped before it had a job for this process
    folder = Path(folder_name)
    header = json.loads((folder / HEADER).read_text())
    site, sites = kit.name, list(header["sites"])
    logs.setup_worker(folder, [site], verbose=False)
    log.info("%s trains with %d PyTorch thread(s) (fedstream client start --threads)", site, torch.get_num_threads())
    link = GrpcSiteLink(kit, str(header["job_id"]), spool=folder)
    job_id, indices = str(header["job_id"]), {s: i for i, s in enumerate(sites)}
    code = folder / "code" / job_folder_name(header.get("folder"))
    overrides = list(header["overrides"])
    job = load_job(code, overrides)  # as the admin signed it and the server checked it
    executor: Callable[[], Executor] | None = None
    try:
        job = load_job(code, overrides + kit.config.overrides)
    except ConfigError as exc:
        if any(exc.key == key or exc.key.startswith(key + ".") for key in _keys(kit.config.overrides)):
            exc = ConfigError(exc.message, file=str(kit.folder / KIT_FILE), key=f"overrides: {exc.key}")
        log.error("%s cannot run this job: %s", site, exc)
        failure = exc
        executor = lambda: Unusable(failure)  # noqa: E731
    make = job_sites(job, job_id, indices, len(sites), folder, link.send_events, executor, journal_events=True)
    SiteHost(link, [site], make, keep_round_results=True).serve()
    logging.shutdown()


def _keys(overrides: list[str]) -> list[str]:
    return [".".join(parse_override(text)[0]) for text in overrides]
