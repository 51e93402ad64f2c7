"""A receiver for tests: writes events to a JSON-lines file, and misbehaves when the test says so.

It runs in its own process (as every receiver does), so the test steers it through files in ``control``:
``down`` makes the backend unavailable, ``hang`` makes a write wait until the file is gone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from fedstream.errors import TrackingError
from fedstream.events import Event, Forwarded
from fedstream.server.receiver import BackendUnavailable, JobInfo, JobOutcome, Receiver


class FileReceiver(Receiver):
    def __init__(
        self,
        *,
        control: str,
        events: list[str] = ["fed.analytics"],  # noqa: B006
        max_pending: int = 1000,
        stop_timeout_s: float = 30.0,
        flush_interval_s: float = 0.01,
        fail_check: bool = False,
        fail_open: bool = False,
        refuse: str = "",
    ) -> None:
        super().__init__(
            events=events,
            batch_size=10,
            flush_interval_s=flush_interval_s,
            max_pending=max_pending,
            stop_timeout_s=stop_timeout_s,
        )
        self.control = control
        self.fail_check, self.fail_open, self.refuse_value = fail_check, fail_open, refuse

    def check(self, job: JobInfo) -> None:
        if self.fail_check:
            raise TrackingError("the file backend is not usable: checked and refused")

    def open(self, job: JobInfo) -> None:
        if self.fail_open:
            raise RuntimeError("cannot open the file backend")
        self.path = Path(self.control) / "written.jsonl"
        self.details["path"] = str(self.path)

    def write(self, events: Sequence[Event]) -> None:
        control = Path(self.control)
        while (control / "hang").exists():
            time.sleep(0.01)  # a backend that does not answer
        if (control / "down").exists():
            raise BackendUnavailable("the file backend is down", events)
        with self.path.open("a") as out:
            for event in events:
                assert isinstance(event, Forwarded)
                if event.data.get("value") == self.refuse_value:
                    self.refuse(1, f"refused {self.refuse_value!r}")
                    continue
                out.write(json.dumps(event.data) + "\n")

    def close(self, outcome: JobOutcome) -> None:
        (Path(self.control) / "closed").write_text(outcome.status)
