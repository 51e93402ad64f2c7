"""The deployment protocol over gRPC: method names, chunking, credentials and how errors read.

Every call carries bytes: :mod:`fedstream.wire` frames (tasks, results, event batches) or small JSON
documents, never a pickle. Frames travel as a stream of chunks of at most :data:`CHUNK_BYTES`, so a model
larger than gRPC's message limit moves, and the receiver refuses a frame over its limit as soon as it is
exceeded. The peer's identity and role come from its verified certificate (:func:`peer`). The methods, their
callers and their states are described in ``docs/deployment-protocol.md``.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedstream.deploy.kit import Kit

SERVICE = "fedstream.Federation"
CHUNK_BYTES = 2 * 1024**2
MESSAGE_LIMIT = CHUNK_BYTES + 64 * 1024  # a chunk and a little; gRPC's own limit per message
INSTANCE = "fedstream-instance"  # metadata: the id of a site's process, new for each process
OPTIONS = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),  # a server that is still starting is found at once
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 10_000),
]
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy")
"""Where gRPC looks for its HTTP proxy, in this order (the first one set wins)."""
SERVER_OPTIONS = [
    *OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),  # a second server on the same port is an error, not a silent load balancer
]


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def chunks(*parts: bytes | memoryview) -> Iterator[bytes]:
    """The bytes of ``parts`` (a frame's pieces: :func:`fedstream.wire.encode_parts`), one after the other,
    in chunks of at most :data:`CHUNK_BYTES`; nothing for no bytes."""
    for part in parts:
        view = memoryview(part)
        for start in range(0, len(view), CHUNK_BYTES):
            yield bytes(view[start : start + CHUNK_BYTES])


def read_chunks(file: BinaryIO) -> Iterator[bytes]:
    """The rest of ``file`` in chunks of at most :data:`CHUNK_BYTES`; the file is closed at the end (also when
    the call ends early)."""
    with file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


class Arrival:
    """A stream of chunks, timed from its first chunk (a long poll's wait for a message is not counted)."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._pieces = pieces
        self._began: float | None = None

    def __iter__(self) -> Iterator[bytes]:
        for piece in self._pieces:
            if self._began is None:
                self._began = time.monotonic()
            yield piece

    def rate(self, size: int) -> str | None:
        """How ``size`` bytes took since the first chunk, for the log: ``256.0 MiB in 0.32 s (800 MiB/s)``; None
        for a message of one chunk (its time says nothing about the link)."""
        if size <= CHUNK_BYTES:
            return None
        seconds = time.monotonic() - self._began if self._began is not None else 0.0
        return f"{size / 2**20:,.1f} MiB in {seconds:.2f} s ({size / 2**20 / max(seconds, 1e-6):,.0f} MiB/s)"


class TooLarge(Exception):
    """A frame grew past its limit."""


def join_chunks(pieces: Iterable[bytes], limit: int, spool: Path | None = None) -> bytearray | mmap.mmap:
    """The frame made of ``pieces`` (not copied again: decode it as it is); raises :class:`TooLarge` once it
    would exceed ``limit`` bytes.

    With ``spool``, a frame of more than one piece is written to a temporary file in that folder as it arrives
    and given back mapped (copy on write: its arrays are writable, the file is never changed), so that receiving
    it holds one piece of memory, and a frame waiting for its turn (a result waiting to be averaged) holds none:
    the kernel keeps it in its page cache, or on disk. The file has no name; it goes when the frame does."""
    received = 0

    def counted(piece: bytes) -> bytes:
        nonlocal received
        received += len(piece)
        if received > limit:
            raise TooLarge(
                f"over the limit of {limit / 2**20:,.1f} MiB (refused after its first {received / 2**20:,.1f} MiB)"
            )
        return piece

    iterator = iter(pieces)
    buffer = bytearray(counted(next(iterator, b"")))
    second = next(iterator, None)
    if second is None:
        return buffer
    rest = itertools.chain([second], iterator)
    if spool is None:
        for piece in rest:
            buffer += counted(piece)
        return buffer
    with tempfile.TemporaryFile(dir=spool) as file:
        file.write(buffer)
        for piece in rest:
            file.write(counted(piece))
        file.flush()
        return mmap.mmap(file.fileno(), received, access=mmap.ACCESS_COPY) if received else bytearray()


def to_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def from_json(data: bytes) -> Any:
    return json.loads(data) if data else {}


@dataclass(frozen=True)
class Peer:
    """Who is calling: the common name and role of the certificate the TLS handshake verified."""

    name: str
    role: str


_peers: dict[bytes, Peer] = {}


def peer(context: grpc.ServicerContext) -> Peer:
    """The caller's verified identity (gRPC checked the chain to the CA before the call got here)."""
    pem = context.auth_context().get("x509_pem_cert", [b""])[0]
    known = _peers.get(pem)
    if known is None:
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        known = _peers[pem] = Peer(str(names[0].value) if names else "", str(roles[0].value) if roles else "")
    return known


def server_credentials(kit: Kit) -> grpc.ServerCredentials:
    """TLS with the server's certificate; callers must present a certificate that chains to the CA."""
    return grpc.ssl_server_credentials([(kit.key, kit.cert)], root_certificates=kit.ca, require_client_auth=True)


def channel(kit: Kit, address: str | None = None) -> grpc.Channel:
    """A mutual-TLS channel to the server named in ``kit`` (or to ``address``), through the proxy the
    environment names (:func:`proxy_for`)."""
    _proxy_environment()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=kit.ca, private_key=kit.key, certificate_chain=kit.cert
    )
    return grpc.secure_channel(address or kit.config.server, credentials, options=OPTIONS)


def _proxy_environment() -> None:
    """Make gRPC honour the proxy settings other tools take: gRPC reads only lower-case names (curl and pip take
    both), and ignores a proxy written without its scheme (``proxy.example.org:3128``: ``http://`` is meant)."""
    for lower in ("https_proxy", "http_proxy", "no_proxy"):
        if not os.environ.get(lower) and os.environ.get(lower.upper()):
            os.environ[lower] = os.environ[lower.upper()]
    for name in PROXY_VARIABLES:
        value = os.environ.get(name, "")
        if value and "://" not in value:
            os.environ[name] = f"http://{value}"


def proxy_for(address: str) -> tuple[str, str] | None:
    """The HTTP proxy gRPC goes through to reach ``address``, and the environment variable that names it, as
    gRPC reads them (``grpc_proxy``, ``https_proxy``, ``http_proxy``; ``no_grpc_proxy`` or ``no_proxy`` list
    host names, or domain suffixes, reached directly; :func:`channel` takes ``HTTPS_PROXY``, ``HTTP_PROXY``
    and ``NO_PROXY`` where the lower-case ones are unset); ``None`` without one."""
    named = next(((var, os.environ[var]) for var in PROXY_VARIABLES if os.environ.get(var)), None)
    if named is None:
        return None
    host = address.rpartition(":")[0].strip("[]").lower()
    excluded = os.environ.get("no_grpc_proxy") or os.environ.get("no_proxy") or ""  # noqa: SIM112 (gRPC reads these)
    for entry in (part.strip().lower().lstrip(".") for part in excluded.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    var, value = named
    written = os.environ.get(var.upper())  # as the user wrote it
    return value, var.upper() if written and value in (written, f"http://{written}") else var


def explain(error: grpc.RpcError, address: str) -> str:
    """A connection error in words a user can act on."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = (error.details() if isinstance(error, grpc.Call) else str(error)) or ""
    text = details.lower()
    via = proxy_for(address)
    if code is grpc.StatusCode.UNAVAILABLE and via is not None:
        proxy, var = via
        check = f"check {var}, or add the server's host to no_proxy to connect without it"
        if "proxy returned response code" in text:
            status = text.rpartition("response code")[2].strip()
            return (
                f"the proxy {proxy} (from {var}) would not connect to {address} (HTTP {status}): it must allow "
                f"CONNECT to that host and port; or {check}"
            )
        if "resolving" in text or "lookup" in text or "dns" in text:
            return f"cannot resolve the host name of the proxy {proxy} (from {var}): {check}"
        if "refused" in text:
            return f"the proxy {proxy} (from {var}) refused the connection: is it running there? {check}"
        if "timeout" in text or "deadline" in text:
            return f"the proxy {proxy} (from {var}) does not answer: {check}"
    if code is grpc.StatusCode.UNAVAILABLE:
        if "resolving" in text or "lookup" in text or "dns" in text:
            return f"cannot resolve the server's host name in {address}: check kit.toml's server and your DNS"
        if "connection refused" in text or ("connect" in text and "refused" in text):
            return f"{address} refused the connection: is fedstream server running there, and the port open?"
        if "certificate" in text and "expired" in text:
            return "a certificate has expired: provision a new kit (or check this machine's clock)"
        if "not yet valid" in text:
            return "a certificate is not valid yet: this machine's clock is behind; fix the clock"
        if "hostname" in text or "subject alternative" in text or "san" in text.split():
            return (
                f"the server's certificate is not for {address.rpartition(':')[0]}: use a host name it was issued for"
            )
        if "certificate" in text or "handshake" in text or "ssl" in text or "tls" in text:
            return (
                f"the TLS handshake with {address} failed: the server and this kit do not trust each other "
                "(a kit from another federation, or a revoked or expired certificate)"
            )
        if "socket closed" in text:
            return (
                f"{address} closed the connection during the TLS handshake: the server did not accept this kit's "
                "certificate (expired, not yet valid, or issued by another federation's CA)"
            )
        if "timeout" in text or "deadline" in text:
            return f"{address} does not answer (a firewall, or the wrong port?)"
        if "cancelling all calls" in text:  # what gRPC tells the calls in progress when its server stops
            return f"the server at {address} stopped (or is restarting)"
        return f"cannot reach {address}: {details}"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{address} does not answer in time (a firewall, or the wrong port?)"
    return details or str(code)
