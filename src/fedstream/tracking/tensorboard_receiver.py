"""Write sites' tracking records and the global metrics to TensorBoard event files on the server.

``<server workspace>/<folder>/<site>/`` holds one site's records and ``.../server/`` the global model's
metrics per round (step = round), one writer per directory, so TensorBoard shows every site as a run and
overlays the same tag across sites. Files are written with TensorBoard's own ``EventFileWriter`` (no torch or
TensorFlow), keep the site's steps and wall times, are flushed after every round and closed at the end.

Mapping: metrics -> scalars; ``add_text`` -> text at its step; ``log_text`` -> text tagged with the file's
path; params -> text ``param/<key>``; tags -> text ``tag/<key>``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from fedstream.events import ANALYTICS, ROUND_COMPLETED, Event
from fedstream.server.receiver import JobInfo, JobOutcome, Receiver, ReceiverReport
from fedstream.tracking.records import METRIC, PARAM, TAG, Record, from_wire

log = logging.getLogger(__name__)

SERVER_RUN = "server"


class TensorBoardReceiver(Receiver):
    """TensorBoard event files per site under the server's workspace.

    Args:
        folder: folder under the server's workspace.
        events: event names to write: sites' tracking records (``fed.analytics``) and the global metrics
            FedAvg reports each round (``round_completed``).
    """

    def __init__(
        self,
        *,
        folder: str = "tb_events",
        events: list[str] = ["fed." + ANALYTICS, ROUND_COMPLETED],  # noqa: B006 - never mutated
    ) -> None:
        if not folder or Path(folder).is_absolute() or ".." in Path(folder).parts:
            raise ValueError(f"folder must be a relative path inside the workspace, got {folder!r}")
        self.events = list(events)
        self._folder = folder
        self._root: Path | None = None
        self._writers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._report = ReceiverReport()

    def start(self, job: JobInfo) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._pb = (event_pb2, summary_pb2, tensor_pb2, types_pb2)
        self._text_metadata = text_metadata.create_summary_metadata(display_name=None, description=None)
        self._writer_class = EventFileWriter
        self._root = job.workspace / self._folder
        self._root.mkdir(parents=True, exist_ok=True)
        self._report.details.update({"logdir": str(self._root), "view": f"tensorboard --logdir {self._root}"})

    def handle(self, event: Event) -> None:
        with self._lock:
            if event.name == ROUND_COMPLETED:
                summary, now = event.data, time.time()
                for key, value in summary.metrics.items():
                    self._report.received += 1
                    self._write(SERVER_RUN, Record(METRIC, key, float(value), summary.round, now))
                for writer in self._writers.values():
                    writer.flush()
                return
            self._report.received += 1
            try:
                record = from_wire(event.data)
            except (TypeError, ValueError) as exc:
                self._drop(f"{event.site}: invalid record: {exc}")
                return
            self._write(event.site, record)

    def _write(self, site: str, record: Record) -> None:
        if record.kind == METRIC:
            assert isinstance(record.value, float)
            self._scalar(site, record.key, record.value, record.step, record.time)
        else:
            prefix = {PARAM: "param/", TAG: "tag/"}.get(record.kind, "")
            self._text(site, prefix + record.key, str(record.value), record.step, record.time)
        self._report.written += 1

    def _scalar(self, run: str, tag: str, value: float, step: int, wall_time: float) -> None:
        event_pb2, summary_pb2, _, _ = self._pb
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
        self._writer(run).add_event(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))

    def _text(self, run: str, tag: str, text: str, step: int, wall_time: float) -> None:
        event_pb2, summary_pb2, tensor_pb2, types_pb2 = self._pb
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()])
        value = summary_pb2.Summary.Value(tag=tag, metadata=self._text_metadata, tensor=tensor)
        summary = summary_pb2.Summary(value=[value])
        self._writer(run).add_event(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))

    def _writer(self, run: str) -> Any:
        writer = self._writers.get(run)
        if writer is None:
            assert self._root is not None
            writer = self._writers[run] = self._writer_class(str(self._root / run), max_queue_size=1000, flush_secs=30)
        return writer

    def _drop(self, reason: str) -> None:
        self._report.dropped += 1
        if len(self._report.errors) < 10:
            self._report.errors.append(reason)
        log.warning("tensorboard: dropped a record: %s", reason)

    def stop(self, outcome: JobOutcome) -> None:
        with self._lock:
            for writer in self._writers.values():
                writer.close()
            self._report.details["runs"] = sorted(self._writers)

    def report(self) -> ReceiverReport:
        return self._report
