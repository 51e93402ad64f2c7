"""``fedstream client start``: a site's long-running client, and the child process that runs one job.

The client connects out to the server (only outbound connections; ``https_proxy`` is honoured by gRPC),
asks for work, and runs each job's site code in a child process, so that a crashing trainer never takes the
client down: a child that dies is started again (the server fails the task it was running), at most
``MAX_STARTS`` times per job. The next child is always started ahead (it imports PyTorch while the client
waits for work), so a job starts on the site at once. It reconnects forever with jittered backoff and says,
once per change, why it cannot connect. Each job's files go to ``WS/jobs/<job id>/``: its code in ``code/``,
the site's log in ``<site>/log.txt``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from fedstream import __version__, logs
from fedstream.children import detach_from_terminal_signals
from fedstream.config import load_job_data
from fedstream.config.loader import apply_values
from fedstream.deploy import protocol
from fedstream.deploy.kit import KIT_FILE, Kit, load_kit
from fedstream.deploy.server import unpack_job
from fedstream.deploy.site_link import Backoff, GrpcSiteLink
from fedstream.errors import ConfigError
from fedstream.site.executor import Executor, Unusable
from fedstream.site.host import SiteHost

log = logging.getLogger(__name__)

MAX_STARTS = 3
HEADER = "job.json"


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
            command = [sys.executable, "-m", "fedstream.deploy.client", str(self.kit.folder)]
            env = {**os.environ, "FEDSTREAM_TORCH_THREADS": str(self.threads)}
            spare = subprocess.Popen(command, env=env, stdin=subprocess.PIPE)
        return spare

    def serve(self) -> int:
        """Take jobs until interrupted; returns the exit code."""
        self.root.mkdir(parents=True, exist_ok=True)
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        console.setLevel(logging.INFO)
        logs.setup_server(self.root, console)
        log.info("fedstream %s client %s connects to %s", __version__, self.kit.name, self.kit.config.server)
        channel = protocol.channel(self.kit)
        next_job = channel.unary_stream(protocol.method("NextJob"))
        backoff, problem = Backoff(), ""
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
                    backoff.wait(self._stop)
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

    def _run(self, header: dict[str, Any], archive: bytes) -> None:
        job_id = str(header["job_id"])
        starts = self._starts[job_id] = self._starts.get(job_id, 0) + 1
        if starts > MAX_STARTS:
            if starts == MAX_STARTS + 1:
                log.error("job %s: the site's process failed %d times; not starting it again", job_id, MAX_STARTS)
            self._stop.wait(10)
            return
        folder = self.root / "jobs" / job_id
        code = folder / "code"
        if not code.exists():
            unpack_job(archive, code)
        (folder / HEADER).write_text(json.dumps(header))
        log.info("job %s (%s): starting the site's process", header["name"], job_id)
        process = self._child()
        assert process.stdin is not None
        try:
            process.stdin.write(f"{folder}\n".encode())
            process.stdin.close()
        except OSError:
            pass  # it died while waiting: its exit code says so below
        self._spare = self._child()
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


def site_main(kit_dir: str) -> None:
    """The child process: once given a job's folder on stdin, host this kit's site in the job over gRPC
    until the server ends it."""
    detach_from_terminal_signals()
    import torch

    from fedstream.pt.executor import job_sites

    torch.set_num_threads(int(os.environ.get("FEDSTREAM_TORCH_THREADS", "1")))
    kit = load_kit(kit_dir, "site")
    folder_name = sys.stdin.readline().strip()
    if not folder_name:
        return  # the client stopped before it had a job for this process
    folder = Path(folder_name)
    header = json.loads((folder / HEADER).read_text())
    site, sites = kit.name, list(header["sites"])
    logs.setup_worker(folder, [site], verbose=False)
    link = GrpcSiteLink(kit, str(header["job_id"]))
    data = header["config"]
    source = str(folder / "code" / str(header["source"]))
    job_id, indices = str(header["job_id"]), {s: i for i, s in enumerate(sites)}
    executor: Callable[[], Executor] | None = None
    job = load_job_data(folder / "code", copy.deepcopy(data), [], source=source)  # as the server checked it
    try:
        apply_values(data, kit.config.overrides, file=str(kit.folder / KIT_FILE))
        job = load_job_data(folder / "code", data, [], source=source)
    except ConfigError as exc:
        if any(exc.key == key or exc.key.startswith(key + ".") for key in kit.config.overrides):
            exc = ConfigError(exc.message, file=str(kit.folder / KIT_FILE), key=f"overrides.{exc.key}")
        log.error("%s cannot run this job: %s", site, exc)
        failure = exc
        executor = lambda: Unusable(failure)  # noqa: E731
    make = job_sites(job, job_id, indices, len(sites), folder, link.send_events, executor)
    SiteHost(link, [site], make).serve()
    logging.shutdown()


if __name__ == "__main__":
    site_main(sys.argv[1])
