"""A deployed site's end of a job: a :class:`~fedstream.link.SiteLink` that pulls its tasks over gRPC.

The site joins the job as a new *instance* (one per process), then polls: each poll waits up to
``poll_s`` for a task or the job's end, and tells the server which task the site already has, so that a task
whose delivery was lost comes again and one already received does not. Results are sent until the server
has them, through any number of reconnects (the server ignores a result it already has); event batches are
sent once per call, and the site's outbox resends them until acknowledged. When the server no longer knows
the instance (it marked the site absent, or restarted), the site joins again.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from fedstream.deploy import protocol
from fedstream.deploy.kit import Kit
from fedstream.errors import TransportError
from fedstream.link import SiteEndpoint
from fedstream.messages import EventAck, EventBatch, Failure, Result, Shutdown, Task
from fedstream.wire import MAX_FRAME_BYTES, decode, encode_parts

log = logging.getLogger(__name__)

JOB = "fedstream-job"  # metadata: the job a call is about
MIN_RETRY_S = 0.2  # the least time between two attempts


class Backoff:
    """Jittered exponential waits between attempts, from ``first_s`` up to ``max_s``, that end early once
    ``channel`` connects: gRPC keeps reconnecting in the background (every 0.2 s at first, see
    :data:`protocol.OPTIONS`), so a server that comes up is used at once rather than after the wait."""

    def __init__(self, channel: grpc.Channel, first_s: float = 0.5, max_s: float = 30.0) -> None:
        self.channel = channel
        self.first_s, self.max_s, self.next_s = first_s, max_s, first_s

    def wait(self, stop: threading.Event, exc: grpc.RpcError | None = None) -> bool:
        """Wait the next interval, or less when ``exc`` says the connection is down and it comes up;
        ``True`` if ``stop`` was set meanwhile."""
        delay = self.next_s * random.uniform(0.5, 1.0)
        self.next_s = min(self.max_s, self.next_s * 2)
        unreachable = isinstance(exc, grpc.Call) and exc.code() is grpc.StatusCode.UNAVAILABLE
        if not unreachable:
            return stop.wait(delay)
        floor = min(delay, MIN_RETRY_S)  # a server that answers UNAVAILABLE while connected is not hammered
        if stop.wait(floor):
            return True
        ready = grpc.channel_ready_future(self.channel)
        deadline = time.monotonic() + delay - floor
        try:
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                try:
                    ready.result(timeout=min(left, 0.5))
                    break
                except grpc.FutureTimeoutError:
                    continue
        finally:
            ready.cancel()
        return stop.is_set()

    def reset(self) -> None:
        self.next_s = self.first_s


class GrpcSiteLink:
    """A site's connection to one job on the server; ``max_frame_bytes`` bounds what it accepts, and a task
    larger than a chunk is received into a temporary file in ``spool`` (see :func:`protocol.join_chunks`)."""

    def __init__(
        self,
        kit: Kit,
        job_id: str,
        *,
        poll_s: float = 10.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        spool: Path | None = None,
    ) -> None:
        self._kit = kit
        self._channel = protocol.channel(kit)
        self._metadata = ((JOB, job_id), (protocol.INSTANCE, secrets.token_hex(6)))
        self._poll_s = poll_s
        self._max_frame_bytes = max_frame_bytes
        self._spool = spool
        self._max_send_bytes = MAX_FRAME_BYTES  # what the server takes: it says so when the site joins
        self._have = ""  # the id of the task this site received last
        self._kinds: dict[str, str] = {}  # the kind of each task received and not answered
        self._stop = threading.Event()
        self._join_lock = threading.Lock()
        self._endpoint: SiteEndpoint | None = None
        self._join = self._channel.unary_unary(protocol.method("Join"))
        self._poll = self._channel.unary_stream(protocol.method("Poll"))
        self._send = self._channel.stream_unary(protocol.method("Send"))
        self._leave = self._channel.unary_unary(protocol.method("Leave"))

    # -- SiteLink ---------------------------------------------------------------------------------------------
    def start(self, endpoint: SiteEndpoint, sites: Sequence[str]) -> None:
        if list(sites) != [self._kit.name]:
            raise TransportError(f"this kit speaks for {self._kit.name} only, not {', '.join(sites)}")
        self._endpoint = endpoint
        self._rejoin()
        threading.Thread(target=self._polling, name="poll", daemon=True).start()

    def send_result(self, result: Result) -> None:
        """Send ``result`` until the server has it (or the job is over). A result over the size the server
        takes is answered with a failure that says so: sent, it would be refused and the site stopped."""
        parts = encode_parts(result)
        kind = self._kinds.pop(result.task_id, "task")
        size = sum(len(part) for part in parts)
        if size > self._max_send_bytes:
            reason = (
                f"its result is {size / 2**20:,.1f} MiB, over the {self._max_send_bytes / 2**20:,.1f} MiB the "
                "server takes (fedstream server start --max-message-mb)"
            )
            log.error("%s: %s", result.task_id, reason)
            parts = encode_parts(Result(result.task_id, result.site, failure=Failure(result.site, kind, reason)))
        self._deliver(parts, retry=True)

    def send_events(self, batch: EventBatch) -> None:
        """One attempt; the outbox resends a batch that is not acknowledged."""
        answer = self._deliver(encode_parts(batch), retry=False)
        if answer and self._endpoint is not None:
            ack = decode(answer)
            if isinstance(ack, EventAck):
                self._endpoint.events_acknowledged(ack)

    def close(self) -> None:
        """Tell the server this site is done (its events are delivered), and release the connection."""
        self._stop.set()
        try:
            self._leave(b"", metadata=self._metadata, timeout=10)
        except grpc.RpcError as exc:
            log.warning("could not say goodbye to the server: %s", protocol.explain(exc, self._kit.config.server))
        self._channel.close()

    # -- inside ------------------------------------------------------------------------------------------------
    def _rejoin(self) -> None:
        """Join the job (again); waits through connection problems."""
        backoff = Backoff(self._channel)
        with self._join_lock:
            while not self._stop.is_set():
                try:
                    answer = protocol.from_json(self._join(b"", metadata=self._metadata, timeout=30))
                    self._max_send_bytes = int(answer.get("max_message_bytes", MAX_FRAME_BYTES))
                    self._have = ""  # a restarted server sends its running task again: the host answers it
                    return
                except grpc.RpcError as exc:
                    if self._fatal(exc):
                        return
                    log.warning("cannot join the job: %s", protocol.explain(exc, self._kit.config.server))
                    backoff.wait(self._stop, exc)

    def _polling(self) -> None:
        assert self._endpoint is not None
        backoff = Backoff(self._channel)
        while not self._stop.is_set():
            request = protocol.to_json({"have": self._have, "wait_s": self._poll_s})
            try:
                arrival = protocol.Arrival(self._poll(request, metadata=self._metadata, timeout=self._poll_s + 30))
                frame = protocol.join_chunks(arrival, self._max_frame_bytes, self._spool)
            except grpc.RpcError as exc:
                if self._fatal(exc):
                    return
                if self._rejoined(exc):
                    continue
                log.warning("lost the server: %s; retrying", protocol.explain(exc, self._kit.config.server))
                backoff.wait(self._stop, exc)
                continue
            except (protocol.TooLarge, TransportError) as exc:
                log.error("the server sent a message this site refuses: %s", exc)
                backoff.wait(self._stop)
                continue
            except OSError as exc:  # the spool's disk is full, say
                log.error("cannot store the server's message in %s: %s; retrying", self._spool, exc)
                backoff.wait(self._stop)
                continue
            backoff.reset()
            if not frame:
                continue
            message = decode(frame, max_bytes=self._max_frame_bytes)
            if isinstance(message, Task):
                if rate := arrival.rate(len(frame)):
                    log.info("task %s came in: %s", message.id, rate)
                self._have = message.id
                self._kinds[message.id] = message.kind
                self._endpoint.task_received(message)
            elif isinstance(message, Shutdown):
                self._endpoint.shutdown(message.reason)
                return

    def _deliver(self, parts: list[bytes | memoryview], *, retry: bool) -> bytes:
        backoff = Backoff(self._channel)
        timeout = 60 + sum(len(part) for part in parts) / 2**20  # a minute, and a second per MiB
        while not self._stop.is_set():
            try:
                answer: bytes = self._send(protocol.chunks(*parts), metadata=self._metadata, timeout=timeout)
                return answer
            except grpc.RpcError as exc:
                if self._fatal(exc):
                    return b""
                if self._rejoined(exc):
                    continue
                if not retry:
                    log.debug("events not sent: %s", protocol.explain(exc, self._kit.config.server))
                    return b""
                log.warning("cannot send a result: %s; retrying", protocol.explain(exc, self._kit.config.server))
                backoff.wait(self._stop, exc)
        return b""

    def _rejoined(self, exc: grpc.RpcError) -> bool:
        """Handle an error that asks for a new join; ``True`` if the call may be retried now."""
        if isinstance(exc, grpc.Call) and exc.code() is grpc.StatusCode.FAILED_PRECONDITION:
            log.warning("the server asks this site to join again: %s", exc.details())
            self._rejoin()
            return True
        return False

    def _fatal(self, exc: grpc.RpcError) -> bool:
        """``True`` if the job is over or this site may not take part: the site host is told to stop."""
        code = exc.code() if isinstance(exc, grpc.Call) else None
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            log.error("the server refused this site: %s", details)
            if self._endpoint is not None and not self._stop.is_set():
                self._endpoint.shutdown(details or "refused")
            self._stop.set()
            return True
        return False
