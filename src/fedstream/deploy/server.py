"""``fedstream server start``: one long-running server that runs submitted jobs one at a time.

It listens on one port (gRPC over mutual TLS): sites pull their work (``NextJob``, then ``Join``, ``Poll``,
``Send``, ``Leave`` for the job in progress), admins manage jobs (``Submit``, ``Jobs``, ``Status``, ``Abort``,
``Sites``). Each job runs in ``WS/jobs/<job id>/`` with the same layout and ``result.json`` as ``simulate``;
its code, signature and state are kept in ``WS/code/<job id>/``. The caller's name and role come from its
verified certificate.

A server that stops in the middle of a job (killed, or stopped with Ctrl-C or SIGTERM) resumes it when it
starts again: after the last completed round, with the same MLflow runs; queued jobs stay queued.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc

from fedstream import __version__, logs
from fedstream.children import sigterm_as_interrupt
from fedstream.config import Job, load_job
from fedstream.deploy import protocol
from fedstream.deploy.archive import MAX_JOB_BYTES, job_folder_name, pack, unpack_job
from fedstream.deploy.kit import Kit
from fedstream.deploy.server_link import PullLink, Refused, Rejoin
from fedstream.deploy.signing import JobRefused, Signature, verify_job
from fedstream.deploy.site_link import JOB
from fedstream.errors import ConfigError, FedstreamError, TransportError
from fedstream.events import EventBus
from fedstream.messages import Result
from fedstream.server.runtime import EXIT_INTERRUPTED, RunResult, ServerRuntime, build, new_job_id
from fedstream.wire import MAX_FRAME_BYTES, decode, encode, encode_parts
from fedstream.workflows.base import RoundCompleted
from fedstream.workspace import MARKER, Workspace, check_site_names, exclusive

log = logging.getLogger(__name__)

ENDED = ("completed", "failed", "aborted")
EVENTS_LIMIT = 64 * 1024**2
"""The largest message a site's events may take, whatever the limit for results: a batch holds about 4 MiB
of texts, which JSON's escapes can make a few times longer."""

RPC_THREADS = 2048
"""Calls the server serves at once. Every connected site holds one long poll (a thread each, for up to
``poll_s``), and its results and events need threads beside it; threads start only when calls need them. With
64, a 200-site round waited for polls to time out: 64 s instead of seconds."""
RECORD = "job.json"
LOG_TAIL_BYTES = 256 * 1024
ARCHIVE = "job.tar.gz"


@dataclass(frozen=True)
class ServerSettings:
    """How the server treats its sites and their messages."""

    absent_after_s: float = 30.0
    poll_s: float = 10.0
    max_message_bytes: int = MAX_FRAME_BYTES  # 4 GiB: the largest result (weights and all) a site may send
    present_within_s: float = 30.0  # a site seen this recently counts as connected (fedstream sites)
    load_timeout_s: float = 120.0  # the longest a job's code may take to load (its modules' import-time code)


@dataclass
class JobRecord:
    """A submitted job and what became of it."""

    id: str
    name: str
    submitter: str
    sites: list[str]
    overrides: list[str]
    signature: Signature
    code: Path  # the job folder, named as on the admin's machine
    archive: bytes
    # queued, starting (its code loads; never saved), running, interrupted (resumes at the next start), completed,
    # failed, aborted
    state: str = "queued"
    submitted: float = field(default_factory=time.time)
    round: int = 0
    num_rounds: int = 0
    aborted_by: str = ""
    error: str = ""  # why a job that never started failed (a job that ran says why in its result)
    exit_code: int | None = None
    result: dict[str, Any] | None = None
    link: PullLink | None = None
    runtime: ServerRuntime | None = None

    def save(self) -> None:
        """Keep the record (and the archive, once) in its code folder, so that a restarted server knows it."""
        folder = self.code.parent
        archive = folder / ARCHIVE
        if not archive.exists():
            archive.write_bytes(self.archive)
        data = {
            "id": self.id,
            "name": self.name,
            "submitter": self.submitter,
            "sites": self.sites,
            "overrides": self.overrides,
            "signature": self.signature.signature,
            "certificate": self.signature.certificate,
            "folder": self.code.name,
            "submitted": self.submitted,
            "state": self.state,
            "round": self.round,
            "num_rounds": self.num_rounds,
            "exit_code": self.exit_code,
            "error": self.error,
        }
        partial = folder / (RECORD + ".partial")
        partial.write_text(json.dumps(data, indent=2))
        os.replace(partial, folder / RECORD)

    @staticmethod
    def load(folder: Path) -> JobRecord:
        data = json.loads((folder / RECORD).read_text())
        signature = Signature(data["signature"], data["certificate"])
        record = JobRecord(
            data["id"],
            data["name"],
            data["submitter"],
            data["sites"],
            data["overrides"],
            signature,
            folder / data["folder"],
            (folder / ARCHIVE).read_bytes(),
        )
        record.submitted, record.state, record.exit_code = data["submitted"], data["state"], data["exit_code"]
        record.error = data.get("error", "")
        record.round, record.num_rounds = data.get("round", 0), data.get("num_rounds", 0)
        return record

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "submitter": self.submitter,
            "sites": self.sites,
            "submitted": self.submitted,
            "round": self.round,
            "num_rounds": self.num_rounds,
            "exit_code": self.exit_code,
            "error": self.error or (self.result or {}).get("error") or None,
            "result": self.result,
        }


class FederationServer:
    """The server: the gRPC service, the job queue, and the job in progress.

    Args:
        kit: the server's startup kit.
        workspace: where jobs run (``jobs/``) and their code is kept (``code/``).
        listen: the address to listen on (``0.0.0.0:PORT`` by default, the kit's port).
        settings: liveness and size limits.
        console: where log records are shown besides the log files.
    """

    def __init__(
        self,
        kit: Kit,
        workspace: Path,
        *,
        listen: str = "",
        settings: ServerSettings | None = None,
        console: logging.Handler | None = None,
    ) -> None:
        self.kit = kit
        self.root = workspace
        self.settings = settings or ServerSettings()
        self.listen = listen or f"0.0.0.0:{kit.config.port}"
        self._console = console
        self._cond = threading.Condition()
        self._load_lock = threading.Lock()
        self._loading = ""  # the job whose code loads under the load lock, or loaded last
        self._torch_imported = threading.Event()
        self._jobs: dict[str, JobRecord] = {}
        self._queue: deque[JobRecord] = deque()
        self._seen: dict[str, tuple[float, str]] = {}  # site -> (last call, its fedstream version)
        workers = futures.ThreadPoolExecutor(max_workers=RPC_THREADS)
        self._grpc = grpc.server(workers, options=protocol.SERVER_OPTIONS)
        handlers = {
            "NextJob": grpc.unary_stream_rpc_method_handler(self._site(self._next_job)),
            "Join": grpc.unary_unary_rpc_method_handler(self._site(self._join)),
            "Poll": grpc.unary_stream_rpc_method_handler(self._site(self._poll)),
            "Send": grpc.stream_unary_rpc_method_handler(self._site(self._receive)),
            "Leave": grpc.unary_unary_rpc_method_handler(self._site(self._leave)),
            "Decline": grpc.unary_unary_rpc_method_handler(self._site(self._decline)),
            "Submit": grpc.stream_unary_rpc_method_handler(self._admin(self._submit)),
            "Jobs": grpc.unary_unary_rpc_method_handler(self._admin(self._list)),
            "Status": grpc.unary_unary_rpc_method_handler(self._admin(self._status)),
            "Abort": grpc.unary_unary_rpc_method_handler(self._admin(self._abort)),
            "Sites": grpc.unary_unary_rpc_method_handler(self._admin(self._sites)),
            "Logs": grpc.unary_unary_rpc_method_handler(self._admin(self._logs)),
            "Download": grpc.unary_stream_rpc_method_handler(self._admin(self._download)),
        }
        self._grpc.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(protocol.SERVICE, handlers),))
        try:
            self.port = self._grpc.add_secure_port(self.listen, protocol.server_credentials(kit))
        except RuntimeError:
            raise TransportError(f"cannot listen on {self.listen}: {why_not_listen(self.listen)}") from None

    # -- running ------------------------------------------------------------------------------------------------
    def serve(self) -> int:
        """Run queued jobs until interrupted (Ctrl-C or SIGTERM); returns the exit code. Raises
        :class:`ConfigError` if another process uses the workspace."""
        with exclusive(self.root, f"the fedstream server {self.kit.name}"):
            return self._serve()

    def _serve(self) -> int:
        logs.setup_server(self.root, self._console)
        self._restore()
        self._grpc.start()
        address = f"{self.listen.rpartition(':')[0]}:{self.port}"  # the port gRPC chose, if --listen said 0
        log.info("fedstream %s server %s listening on %s", __version__, self.kit.name, address)
        try:
            with sigterm_as_interrupt():
                import torch  # noqa: F401  (every job needs it: imported once, while sites connect, before a job loads)

                self._torch_imported.set()
                while True:
                    record = self._next_queued()
                    if record is not None and self._start(record) == EXIT_INTERRUPTED:
                        break
        except KeyboardInterrupt:
            log.info("interrupted; stopping")
        finally:
            self._torch_imported.set()  # a submission waiting for it (the server stopped while importing) goes on
            self._grpc.stop(grace=0.1).wait()  # long polls are cut; sites retry
        return EXIT_INTERRUPTED

    def _restore(self) -> None:
        """Know the jobs of earlier runs of the server: ended ones, queued ones, and the one to resume."""
        for record_file in sorted((self.root / "code").glob(f"*/{RECORD}")):
            try:
                record = JobRecord.load(record_file.parent)
            except (OSError, ValueError, KeyError) as exc:
                log.error("cannot read %s (%s); that job is forgotten", record_file, exc)
                continue
            result = self.root / "jobs" / record.id / "result.json"
            if record.state not in ENDED and (refused := self._refused_now(record)):
                log.warning("job %s (%s) is not resumed: %s", record.name, record.id, refused)
                record.state, record.error, record.exit_code = "failed", f"not resumed: {refused}", 1
                record.save()
            if record.state in ENDED:
                record.result = json.loads(result.read_text()) if result.is_file() else None
            elif record.state != "queued":  # it was running when the server stopped
                record.state = "queued"
                log.warning(
                    "job %s (%s) was interrupted by a restart of the server; it resumes", record.name, record.id
                )
                self._queue.appendleft(record)
            else:
                self._queue.append(record)
            self._jobs[record.id] = record

    def _refused_now(self, record: JobRecord) -> str:
        """Why the sites would refuse ``record``'s job now (the federation's kits were made anew since it was
        submitted, or its admin's certificate expired); empty if they would take it."""
        try:
            verify_job(self.kit.ca, record.archive, record.overrides, record.signature)
        except JobRefused as exc:
            return f"{exc}: the sites would refuse it"
        return ""

    def _next_queued(self) -> JobRecord | None:
        with self._cond:
            if not self._queue:
                self._cond.wait(1.0)
            if not self._queue:
                return None
            record = self._queue.popleft()
            record.state = "starting"
            self._cond.notify_all()
            return record

    def _start(self, record: JobRecord) -> int:
        """Run ``record``'s job; a job that cannot even start fails with the reason, and the server goes on."""
        try:
            return self._run(record).exit_code
        except Exception as exc:  # a job's own code may raise anything while it is loaded: never the server's end
            if not isinstance(exc, FedstreamError | OSError):
                log.error("job %s (%s) failed to load:\n%s", record.name, record.id, traceback.format_exc())
                exc = FedstreamError(f"{type(exc).__name__}: {exc}")
            log.error("job %s (%s) cannot start: %s", record.name, record.id, exc)
            with self._cond:
                record.state, record.error, record.exit_code = "failed", f"cannot start: {exc}", 1
                record.link = record.runtime = None
                record.save()
                self._cond.notify_all()
            logs.setup_server(self.root, self._console)
            return 1

    def _hold_load_lock(self, what: str) -> None:
        """Take the lock under which a job's code loads (whoever loads releases it), for ``what``; raises
        :class:`FedstreamError` if another job's code has not loaded within the load timeout."""
        self._torch_imported.wait()
        if not self._load_lock.acquire(timeout=self.settings.load_timeout_s):
            raise FedstreamError(
                f"the server has been loading {self._loading} for over {self.settings.load_timeout_s:.0f} s "
                "(fedstream server start --load-timeout): code that its modules run when imported has not "
                "returned, and no other job can load until it does (restarting the server ends it)"
            )
        self._loading = what

    def _load(self, folder: Path, overrides: list[str]) -> Job:
        """Load a job afresh, holding the load lock: the modules of earlier jobs' folders are forgotten first,
        so that a long-running server never runs an earlier version of a job's module of the same name."""
        code = (self.root / "code").resolve()
        sys.path[:] = [entry for entry in sys.path if not Path(entry).resolve().is_relative_to(code)]
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if file and Path(file).resolve().is_relative_to(code):
                del sys.modules[name]
        return load_job(folder, overrides)

    def _run(self, record: JobRecord) -> RunResult:
        self._hold_load_lock(f"the code of job {record.id}")
        try:
            job = self._load(record.code, record.overrides)
        finally:
            self._load_lock.release()
        components = build(job, record.sites)
        folder = self.root / "jobs" / record.id
        resuming = (folder / MARKER).is_file()  # keep its rounds, models and events journal
        workspace = Workspace(folder) if resuming else Workspace.prepare(folder, record.sites)
        (workspace.server / "job.toml").write_text(job.to_toml())
        logs.setup_server(workspace.root, self._console)
        bus = EventBus()

        def progress(event: RoundCompleted) -> None:
            record.round = event.summary.round

        bus.subscribe(RoundCompleted, progress)
        details = {"submitter": record.submitter, "server": self.kit.name}
        runtime = ServerRuntime(
            job,
            components,
            workspace,
            record.sites,
            job_id=record.id,
            bus=bus,
            details=lambda: details,
            journal_events=True,
        )
        link = PullLink(record.sites, absent_after_s=self.settings.absent_after_s)
        with self._cond:
            record.state, record.link, record.runtime = "running", link, runtime
            record.num_rounds = int(job.to_dict()["server"]["workflow"]["args"].get("num_rounds", 0))
            record.save()
            self._cond.notify_all()
            aborted_by = record.aborted_by
        if aborted_by:  # while it was loading
            runtime.abort(f"aborted by {aborted_by}")
        log.info("job %s (%s) from %s starts on %s", record.name, record.id, record.submitter, ", ".join(record.sites))
        result = runtime.run(link)
        with self._cond:
            if record.aborted_by:
                record.state = "aborted"
            elif result.exit_code == EXIT_INTERRUPTED:
                record.state = "interrupted"  # the server stops; it resumes the job when it starts again
            else:
                record.state = str(result.data["status"])
            record.exit_code, record.result, record.runtime = result.exit_code, result.data, None
            record.save()
            self._cond.notify_all()
        logs.setup_server(self.root, self._console)
        log.info("job %s (%s) %s", record.name, record.id, record.state)
        return result

    # -- the sites' calls ------------------------------------------------------------------------------------------
    def _site(self, handler: Callable[..., Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            who = protocol.peer(context)
            if who.role != "site":
                _refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"{who.name} is a {who.role}, not a site")
            with self._cond:
                version = self._seen.get(who.name, (0.0, ""))[1]
                self._seen[who.name] = (time.time(), version)
            try:
                return handler(who.name, request, context)
            except Rejoin as exc:
                _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            except Refused as exc:
                _refuse(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
            except Exception as exc:
                _internal_error(context, who.name, exc)

        return call

    def _job_for(self, site: str, context: grpc.ServicerContext) -> tuple[PullLink, str]:
        metadata = dict(context.invocation_metadata())
        job_id, instance = str(metadata.get(JOB, "")), str(metadata.get(protocol.INSTANCE, ""))
        with self._cond:
            record = self._jobs.get(job_id)
            link = record.link if record is not None and record.state == "running" else None
        if record is not None and record.state in ("queued", "starting", "interrupted"):  # about to start or resume
            _refuse(context, grpc.StatusCode.UNAVAILABLE, f"job {job_id} has not started yet")
        if link is None or record is None:
            _refuse(context, grpc.StatusCode.NOT_FOUND, f"job {job_id!r} is not running on this server")
        if site not in record.sites:
            _refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"{site} is not one of job {job_id}'s sites")
        return link, instance

    def _next_job(self, site: str, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """The job in progress if ``site`` takes part in it and has not finished it; nothing after ``poll_s``."""
        asked = protocol.from_json(request)
        with self._cond:
            self._seen[site] = (time.time(), str(asked.get("version", "")))
            deadline = time.monotonic() + self.settings.poll_s
            while (record := self._open_job(site)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not context.is_active():
                    return
                self._cond.wait(min(remaining, 1.0))
        header = {
            "job_id": record.id,
            "name": record.name,
            "sites": record.sites,
            "folder": record.code.name,
            "overrides": record.overrides,
            "signature": record.signature.signature,
            "certificate": record.signature.certificate,
        }
        yield protocol.to_json(header)
        yield from protocol.chunks(record.archive)

    def _open_job(self, site: str) -> JobRecord | None:
        for record in self._jobs.values():
            link = record.link
            if record.state == "running" and link is not None and site in record.sites and not link.finished(site):
                return record
        return None

    def _join(self, site: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        link, instance = self._job_for(site, context)
        link.join(site, instance)
        return protocol.to_json({"max_message_bytes": self.settings.max_message_bytes})

    def _poll(self, site: str, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        link, instance = self._job_for(site, context)
        asked = protocol.from_json(request)
        wait_s = min(float(asked.get("wait_s", self.settings.poll_s)), 60.0)
        message = link.poll(site, instance, str(asked.get("have", "")), wait_s)  # here, so that refusals reach _site
        return protocol.chunks(*encode_parts(message)) if message is not None else iter(())

    def _receive(self, site: str, request: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        link, instance = self._job_for(site, context)
        limit = max(self.settings.max_message_bytes, EVENTS_LIMIT)  # the limit is the results': events always pass
        try:
            arrival = protocol.Arrival(request)
            frame = protocol.join_chunks(arrival, limit, spool=self.root)  # N sites' results wait on disk
            message = decode(frame, max_bytes=limit)
            if isinstance(message, Result) and len(frame) > self.settings.max_message_bytes:
                raise protocol.TooLarge(f"over the limit of {self.settings.max_message_bytes / 2**20:,.1f} MiB")
            if isinstance(message, Result) and (rate := arrival.rate(len(frame))):
                log.info("%s: the result of %s came in: %s", site, message.task_id, rate)
        except protocol.TooLarge as exc:
            log.error("%s sent a message %s; refused", site, exc)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"{site}: the message is {exc}")
        except TransportError as exc:
            log.error("%s sent a malformed message: %s", site, exc)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"{site}: malformed message: {exc}")
        except OSError as exc:  # the workspace's disk is full, say: the site tries again later
            log.error("cannot store a message from %s in %s: %s", site, self.root, exc)
            _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server cannot store the message now: {exc}")
        try:
            ack = link.receive(site, instance, message)
        except Refused as exc:
            log.error("refused: %s", exc)
            raise
        return encode(ack) if ack is not None else b""

    def _leave(self, site: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        link, instance = self._job_for(site, context)
        link.leave(site, instance)
        with self._cond:
            self._cond.notify_all()
        return b""

    def _decline(self, site: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        """``site`` will not run the job: not signed for it, code it refuses, or its process keeps failing."""
        link, _ = self._job_for(site, context)
        reason = str(protocol.from_json(request).get("reason", ""))[:2000]
        log.error("%s declined the job: %s", site, reason)
        link.decline(site, reason)
        return b""

    # -- the admins' calls -------------------------------------------------------------------------------------
    def _admin(self, handler: Callable[..., Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            who = protocol.peer(context)
            if who.role != "admin":
                log.error("%s (a %s) tried to manage jobs; refused", who.name, who.role)
                _refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"{who.name} is a {who.role}, not an admin")
            try:
                return handler(who.name, request, context)
            except Exception as exc:
                _internal_error(context, who.name, exc)

        return call

    def _submit(self, admin: str, request: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        header = protocol.from_json(next(request, b""))
        try:
            archive = bytes(protocol.join_chunks(request, MAX_JOB_BYTES))
        except protocol.TooLarge as exc:
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"the job folder is {exc}; keep data out of it")
        job_id = new_job_id()
        code = (self.root / "code" / job_id / job_folder_name(header.get("folder"))).resolve()
        overrides = [str(item) for item in header.get("overrides", [])]
        signature = Signature(str(header.get("signature", "")), str(header.get("certificate", "")))
        try:
            signer = verify_job(self.kit.ca, archive, overrides, signature)
            if signer != admin:
                raise JobRefused(f"the job was signed by {signer}, not by {admin} who submits it")
            unpack_job(archive, code)
            sites = self._job_sites(header.get("sites"))
            job = self._check(code, overrides, sites, f"the code of job folder {code.name!r} from {admin}")
        except FedstreamError as exc:
            log.error("refused a job from %s: %s", admin, exc)
            shutil.rmtree(code.parent, ignore_errors=True)
            _refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc).replace(str(code), "<JOB>"))
        record = JobRecord(job_id, job.name, admin, sites, overrides, signature, code, archive)
        record.save()
        with self._cond:
            self._jobs[job_id] = record
            self._queue.append(record)
            self._cond.notify_all()
        log.info("%s submitted job %s (%s) for %s", admin, job.name, job_id, ", ".join(sites))
        return protocol.to_json({"job_id": job_id})

    def _check(self, code: Path, overrides: list[str], sites: list[str], what: str) -> Job:
        """The job in ``code``, loaded and its components built for ``sites``, within the load timeout: a job
        whose modules run code that does not return when imported is refused (the thread loading it stays)."""
        checked: futures.Future[Job] = futures.Future()
        self._hold_load_lock(what)

        def check() -> None:
            try:
                job = self._load(code, overrides)
                build(job, sites)
                checked.set_result(job)
            except BaseException as exc:  # raised again in the caller's thread
                checked.set_exception(exc)
            finally:
                self._load_lock.release()

        threading.Thread(target=check, name="check job", daemon=True).start()
        try:
            return checked.result(timeout=self.settings.load_timeout_s)
        except futures.TimeoutError:
            raise FedstreamError(
                f"the job's code did not load within {self.settings.load_timeout_s:.0f} s (fedstream server start "
                "--load-timeout): a module of it runs code when imported (training, downloads, waiting) that has "
                "not returned; move that code into the components' methods. No other job can load on the server "
                "until it returns (restarting the server ends it)"
            ) from None

    def _job_sites(self, asked: Any) -> list[str]:
        if asked:
            try:
                return check_site_names(list(asked))
            except ValueError as exc:
                raise ConfigError(str(exc), key="--sites") from None
        now = time.time()
        with self._cond:
            sites = sorted(s for s, (seen, _) in self._seen.items() if now - seen < self.settings.present_within_s)
        if not sites:
            raise ConfigError("no site is connected; start fedstream client on the sites, or name them with --sites")
        return sites

    def _list(self, admin: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._cond:
            jobs = [{k: v for k, v in r.status().items() if k != "result"} for r in self._jobs.values()]
        return protocol.to_json(jobs)

    def _record(self, request: bytes, context: grpc.ServicerContext) -> JobRecord:
        job_id = str(protocol.from_json(request).get("job_id", ""))
        record = self._jobs.get(job_id)
        if record is None:
            _refuse(context, grpc.StatusCode.NOT_FOUND, f"no job {job_id!r} on this server")
        return record

    def _status(self, admin: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._cond:
            return protocol.to_json(self._record(request, context).status())

    def _abort(self, admin: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._cond:
            record = self._record(request, context)
            if record.state in ENDED:
                _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, f"job {record.id} already {record.state}")
            record.aborted_by = admin
            if any(queued is record for queued in self._queue):
                self._queue.remove(record)
                record.state, record.error = "aborted", f"aborted by {admin}"
                record.save()
            runtime = record.runtime  # None also for a job taken from the queue and still loading: _run aborts it
        log.warning("%s aborted job %s", admin, record.id)
        if runtime is not None:
            runtime.abort(f"aborted by {admin}")
        return b""

    def _outputs(self, request: bytes, context: grpc.ServicerContext) -> Path:
        with self._cond:
            record = self._record(request, context)
        folder = self.root / "jobs" / record.id
        if not folder.is_dir():
            _refuse(context, grpc.StatusCode.FAILED_PRECONDITION, f"job {record.id} has not started yet")
        return folder

    def _logs(self, admin: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The end of the job's server log (the sites' own logs stay on the sites)."""
        log_file = self._outputs(request, context) / "log.txt"
        with open(log_file, "rb") as file:
            file.seek(max(0, log_file.stat().st_size - LOG_TAIL_BYTES))
            return file.read()

    def _download(self, admin: str, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """The job's outputs on the server (result.json, models, logs, TensorBoard files) as a gzipped tar,
        packed into a temporary file first: memory stays a chunk whatever the models' size."""
        folder = self._outputs(request, context)
        spool = tempfile.TemporaryFile(dir=self.root)  # noqa: SIM115 - read_chunks closes it
        try:
            pack(folder, spool)
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return protocol.read_chunks(spool)

    def _sites(self, admin: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        now = time.time()
        with self._cond:
            sites = [
                {"site": site, "version": version, "last_seen_s": round(now - seen, 1)}
                for site, (seen, version) in sorted(self._seen.items())
            ]
        return protocol.to_json(sites)


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: grpc's abort raises")


def _internal_error(context: grpc.ServicerContext, caller: str, exc: Exception) -> NoReturn:
    """End a call that failed on a defect of the server: its traceback goes to the server's log, one line to
    the caller. A call already refused (grpc's abort raises too) stays refused."""
    if context.code() is not None:
        raise exc
    log.error("a call from %s failed on the server:\n%s", caller, traceback.format_exc())
    _refuse(
        context,
        grpc.StatusCode.INTERNAL,
        f"the server failed ({type(exc).__name__}: {str(exc)[:200]}); its log has more",
    )


def why_not_listen(listen: str) -> str:
    """Why a server cannot listen on ``listen`` (``host:port``), found by binding a plain socket there."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        return "expected HOST:PORT (--listen 0.0.0.0:8443, say)"
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, OverflowError) as exc:
        return f"{host} is not an address of this machine ({exc})"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} is in use by another process (another fedstream server?)"
                if exc.errno == errno.EACCES:
                    return f"port {port} needs privileges this user lacks (ports below 1024); choose a higher one"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"{host} is not an address of this machine"
                return exc.strerror or str(exc)
    return "gRPC refused it (see the lines above)"
