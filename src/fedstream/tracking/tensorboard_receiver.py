"""Write sites' tracking records and the global metrics to TensorBoard event files on the server.

``<server workspace>/<folder>/<site>/`` holds one site's records and ``.../server/`` the global model's
metrics per round (step = round), one writer per directory, so TensorBoard shows every site as a run and
overlays the same tag across sites. Records keep the site's steps and wall times; files are flushed after
every batch written (at most ``flush_interval_s`` apart) and closed at the end.

Files are written in TensorFlow's record format (see :class:`EventFile`; no torch or TensorFlow) over an
ordinary buffered file. TensorBoard's ``EventFileWriter`` would do the same but, without TensorFlow
installed, it reopens the file for every record and checksums in pure Python.

Mapping: metrics -> scalars; ``add_text`` -> text at its step; ``log_text`` -> text tagged with the file's
path; params -> text ``param/<key>``; tags -> text ``tag/<key>``.

On a deployed server, events carry their position in the server's events journal, and a receiver killed with
its server may have written a batch whose mark the journal never got: the next server gives it again.
So each run's file records, after every batch, the last position it holds (a ``log_message`` event, which
TensorBoard ignores). A receiver that opens on files of a killed one cuts each file after its last such
record (what follows is a batch it was killed while writing) and skips the events it finds already written:
each record once.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from fedstream.errors import TrackingError
from fedstream.events import Event, Forwarded
from fedstream.server.receiver import JobInfo, JobOutcome, Receiver
from fedstream.tracking.records import FED_ANALYTICS, METRIC, PARAM, TAG, Record, from_wire
from fedstream.workflows.base import RoundCompleted

log = logging.getLogger(__name__)

SERVER_RUN = "server"
WRITTEN_THROUGH = "fedstream: written through journal position "


class TensorBoardReceiver(Receiver):
    """TensorBoard event files per site under the server's workspace.

    Args:
        folder: folder under the server's workspace.
        events: event names to write: sites' tracking records (``fed.analytics``) and the global metrics
            FedAvg reports each round (``round_completed``).
        flush_interval_s: how often written records are flushed to the files.
        max_pending: records held before the sites are slowed down.
        stop_timeout_s: at the end, how long to keep writing what is left.
    """

    def __init__(
        self,
        *,
        folder: str = "tb_events",
        events: list[str] = [FED_ANALYTICS, RoundCompleted.name],  # noqa: B006 - never mutated
        flush_interval_s: float = 1.0,
        max_pending: int = 100_000,
        stop_timeout_s: float = 60.0,
    ) -> None:
        if not folder or Path(folder).is_absolute() or ".." in Path(folder).parts:
            raise ValueError(f"folder must be a relative path inside the workspace, got {folder!r}")
        super().__init__(
            events=events,
            batch_size=10_000,
            flush_interval_s=flush_interval_s,
            max_pending=max_pending,
            stop_timeout_s=stop_timeout_s,
        )
        self._folder = folder
        self._root: Path | None = None
        self._writers: dict[str, EventFile] = {}

    def check(self, job: JobInfo) -> None:
        folder = job.workspace / self._folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"TensorBoard: cannot create {folder}: {exc.strerror}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TrackingError(f"TensorBoard: {folder} is not writable by this user")

    def open(self, job: JobInfo) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
        from tensorboard.plugins.text import metadata as text_metadata

        self._pb = (event_pb2, summary_pb2, tensor_pb2, types_pb2)
        self._text_metadata = text_metadata.create_summary_metadata(display_name=None, description=None)
        self._root = job.workspace / self._folder
        self._root.mkdir(parents=True, exist_ok=True)
        self._written = _resume(self._root)
        self.details.update({"logdir": str(self._root), "view": f"tensorboard --logdir {self._root}"})

    def write(self, events: Sequence[Event]) -> None:
        through: dict[str, int] = {}  # run -> the last journal position this batch wrote to it
        for event in events:
            if not isinstance(event, RoundCompleted | Forwarded):
                self.refuse(1, f"cannot write a {event.name!r} event")
                continue
            run = SERVER_RUN if isinstance(event, RoundCompleted) else event.site
            if event.position and event.position <= self._written.get(run, 0):
                continue  # a killed server's receiver wrote it
            try:
                records = _records(event)
            except (TypeError, ValueError) as exc:
                self.refuse(1, f"{run}: invalid record: {exc}")
                continue
            if event.position and run not in self._writers:  # a new file starts saying what is written before it
                self._writer(run).add_event(self._written_through(self._written.get(run, 0)))
            for record in records:
                self._write(run, record)
            if event.position:
                through[run] = event.position
        for run, position in through.items():
            self._writers[run].add_event(self._written_through(position))
            self._written[run] = position
        for writer in self._writers.values():
            writer.flush()

    def close(self, outcome: JobOutcome) -> None:
        for writer in self._writers.values():
            writer.close()
        self.details["runs"] = sorted(self._writers)

    def _write(self, run: str, record: Record) -> None:
        if record.kind == METRIC:
            assert isinstance(record.value, float)
            self._scalar(run, record.key, record.value, record.step, record.time)
        else:
            prefix = {PARAM: "param/", TAG: "tag/"}.get(record.kind, "")
            self._text(run, prefix + record.key, str(record.value), record.step, record.time)

    def _scalar(self, run: str, tag: str, value: float, step: int, wall_time: float) -> None:
        event = self._pb[0].Event(wall_time=wall_time, step=step)
        entry = event.summary.value.add()  # filled in place: twice as fast as building the parts
        entry.tag, entry.simple_value = tag, value
        self._writer(run).add_event(event)

    def _text(self, run: str, tag: str, text: str, step: int, wall_time: float) -> None:
        event_pb2, _, _, types_pb2 = self._pb
        event = event_pb2.Event(wall_time=wall_time, step=step)
        entry = event.summary.value.add()
        entry.tag = tag
        entry.metadata.CopyFrom(self._text_metadata)
        entry.tensor.dtype = types_pb2.DT_STRING
        entry.tensor.string_val.append(text.encode())
        self._writer(run).add_event(event)

    def _writer(self, run: str) -> EventFile:
        writer = self._writers.get(run)
        if writer is None:
            assert self._root is not None
            writer = self._writers[run] = EventFile(self._root / run)
        return writer

    def _written_through(self, position: int) -> Any:
        """The record that says a run's file holds every journaled event of the run up to ``position``."""
        event_pb2 = self._pb[0]
        message = event_pb2.LogMessage(level=event_pb2.LogMessage.INFO, message=f"{WRITTEN_THROUGH}{position}")
        return event_pb2.Event(wall_time=time.time(), log_message=message)


def _records(event: RoundCompleted | Forwarded) -> list[Record]:
    """What ``event`` writes: a round's global metrics (step = round), or a site's record (checked)."""
    if isinstance(event, Forwarded):
        return [from_wire(event.data)]
    summary = event.summary
    return [
        Record(METRIC, key, float(value), summary.round, summary.ended_at) for key, value in summary.metrics.items()
    ]


def _resume(root: Path) -> dict[str, int]:
    """Per run under ``root``: the last journal position its files say they hold. Each file that records
    positions is cut after its last one: the rest is a batch its writer was killed while writing, which the
    journal gives again."""
    written: dict[str, int] = {}
    for path in sorted(root.glob("*/events.out.tfevents.*")):
        with path.open("rb") as file:
            found = _last_written_through(file)
        if found is None:
            continue
        position, end, damaged = found
        if damaged:
            log.warning("TensorBoard: %s holds a damaged record; it is kept as it is", path)
        elif end < path.stat().st_size:
            log.warning("TensorBoard: %s ends with a batch its writer was killed writing; it is written again", path)
            os.truncate(path, end)
        written[path.parent.name] = max(written.get(path.parent.name, 0), position)
    return written


def _last_written_through(file: BinaryIO) -> tuple[int, int, bool] | None:
    """The position in the last "written through" record of an event file, where that record ends, and
    whether a damaged record (not one cut short by the end of the file) stopped the reading; ``None`` if it
    has no such record. Reads one record at a time."""
    from tensorboard.compat.proto import event_pb2

    found: tuple[int, int] | None = None
    damaged, marker = False, WRITTEN_THROUGH.encode()
    while len(head := file.read(_LENGTH.size + _CRC.size)) == _LENGTH.size + _CRC.size:
        length = head[: _LENGTH.size]
        if _CRC.unpack_from(head, _LENGTH.size)[0] != _masked_crc32c(length):
            damaged = True
            break
        (size,) = _LENGTH.unpack(length)
        rest = file.read(size + _CRC.size)
        if len(rest) < size + _CRC.size:
            break  # cut short
        body = rest[:size]
        if _CRC.unpack_from(rest, size)[0] != _masked_crc32c(body):
            damaged = True
            break
        if marker in body:  # else not one: parse only the candidates
            event = event_pb2.Event.FromString(body)
            if event.HasField("log_message") and event.log_message.message.startswith(WRITTEN_THROUGH):
                found = int(event.log_message.message.removeprefix(WRITTEN_THROUGH)), file.tell()
    return None if found is None else (*found, damaged)


class EventFile:
    """One TensorBoard event file (``events.out.tfevents.<time>.<host>.<pid>.<n>``) in ``folder``.

    Records are framed as TensorFlow's record format wants them: the length (little-endian uint64), its
    masked CRC-32C, the data, the data's masked CRC-32C. The checksums come from ``google-crc32c`` (C);
    TensorBoard's own pure-Python checksum costs about 25 us per record.
    """

    _count = itertools.count()

    def __init__(self, folder: Path) -> None:
        from tensorboard.compat.proto import event_pb2

        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(self._count)}"
        self.path = folder / name
        self._file = self.path.open("wb")
        self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add_event(self, event: Any) -> None:
        data = event.SerializeToString()
        header = _LENGTH.pack(len(data))
        self._file.write(header + _CRC.pack(_masked_crc32c(header)) + data + _CRC.pack(_masked_crc32c(data)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _masked_crc32c(data: bytes) -> int:
    """TensorFlow's masked CRC-32C of ``data``."""
    import google_crc32c

    crc: int = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
