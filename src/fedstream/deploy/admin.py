"""An admin's calls to the server: submit a job, list and watch jobs, abort one, see the connected sites.

Only a certificate with the admin role may make them; the server refuses any other.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from fedstream.config.loader import JOB_FILE
from fedstream.deploy import protocol
from fedstream.deploy.archive import MAX_JOB_BYTES, pack_job, unpack_job
from fedstream.deploy.kit import Kit
from fedstream.deploy.server import ENDED
from fedstream.deploy.signing import sign_job
from fedstream.errors import ConfigError, FedstreamError, TransportError


class Admin:
    """A connection to the server with an admin's kit."""

    def __init__(self, kit: Kit, address: str = "") -> None:
        self.kit = kit
        self.address = address or kit.config.server
        self._channel = protocol.channel(kit, self.address)

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the server accepts connections (it may still be starting)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise TransportError(f"the server at {self.address} did not answer within {timeout_s:g} s") from None

    def submit(self, job_dir: str | Path, overrides: list[str], sites: list[str] | None = None) -> str:
        """Send the job folder (and ``--set`` overrides) to the server's queue; returns the job id."""
        folder = Path(job_dir)
        if not (folder / JOB_FILE).is_file():
            raise ConfigError(f"not a job folder (no {JOB_FILE})", file=str(folder))
        archive = pack_job(folder, MAX_JOB_BYTES)
        if len(archive) > MAX_JOB_BYTES:
            raise ConfigError(
                f"the job folder packs to {len(archive) / 2**20:.0f} MiB, over {MAX_JOB_BYTES // 2**20} MiB; "
                "keep data sets and checkpoints out of it",
                file=str(folder),
            )
        signed = sign_job(self.kit.key, self.kit.cert, archive, overrides)
        header = protocol.to_json(
            {
                "folder": folder.resolve().name,
                "overrides": overrides,
                "sites": sites or [],
                "signature": signed.signature,
                "certificate": signed.certificate,
            }
        )
        call = self._channel.stream_unary(protocol.method("Submit"))
        try:
            answer = call(iter([header, *protocol.chunks(archive)]), timeout=120)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                raise ConfigError((exc.details() or "").replace("<JOB>", str(folder.resolve()))) from None
            raise self._error(exc) from None
        return str(protocol.from_json(answer)["job_id"])

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._call("Jobs", {}))

    def status(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("Status", {"job_id": job_id}))

    def abort(self, job_id: str) -> None:
        self._call("Abort", {"job_id": job_id})

    def sites(self) -> list[dict[str, Any]]:
        return list(self._call("Sites", {}))

    def logs(self, job_id: str) -> str:
        """The end of the job's log on the server."""
        try:
            answer = self._channel.unary_unary(protocol.method("Logs"))(
                protocol.to_json({"job_id": job_id}), timeout=60
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return bytes(answer).decode(errors="replace")

    def download(self, job_id: str, folder: str | Path) -> Path:
        """Fetch the job's outputs on the server into ``folder/<job id>/``; returns that folder."""
        target = Path(folder) / job_id
        call = self._channel.unary_stream(protocol.method("Download"))
        with tempfile.TemporaryFile() as archive:  # models are large: on disk, not in memory
            try:
                for chunk in call(protocol.to_json({"job_id": job_id}), timeout=600):
                    archive.write(chunk)
            except grpc.RpcError as exc:
                raise self._error(exc) from None
            archive.seek(0)
            unpack_job(archive, target)
        return target

    def follow(
        self, job_id: str, show: Callable[[dict[str, Any]], None], every_s: float = 0.25, patience_s: float = 300
    ) -> dict[str, Any]:
        """Call ``show`` with the job's status whenever it changes, until the job ends; returns the last one.
        A server that cannot be reached (restarting) is asked again for up to ``patience_s`` seconds."""
        last: dict[str, Any] = {}
        lost_since = 0.0
        while True:
            try:
                status = self.status(job_id)
            except TransportError as exc:
                if not lost_since:
                    lost_since = time.monotonic()
                    show({"id": job_id, "round": 0, "num_rounds": 0, **last, "state": f"waiting for the server: {exc}"})
                elif time.monotonic() - lost_since > patience_s:
                    raise
                time.sleep(1.0)
                continue
            lost_since = 0.0
            if (status["state"], status["round"]) != (last.get("state"), last.get("round")):
                show(status)
            last = status
            if status["state"] in ENDED:
                return status
            time.sleep(every_s)

    def _call(self, name: str, request: dict[str, Any]) -> Any:
        try:
            answer = self._channel.unary_unary(protocol.method(name))(protocol.to_json(request), timeout=60)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return protocol.from_json(answer)

    def _error(self, exc: grpc.RpcError) -> FedstreamError:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED):
            return FedstreamError(exc.details() if isinstance(exc, grpc.Call) else str(exc))
        return TransportError(protocol.explain(exc, self.address))
