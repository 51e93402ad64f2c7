"""Write sites' tracking records and the global metrics to MLflow, from the server only.

Run layout: one experiment (default: the job's name); one parent run per job, named ``<run_name>-<job id>``,
with the resolved job config as params, the global metrics of every round (step = round) and the final and
best models as artifacts; one child run per site (run name = site, tag ``site``), created when the site's
first record arrives, with the same metric keys on every site so the MLflow UI overlays them.

Records keep the site's step and timestamp. They are buffered per run and written by one background thread
with ``log_batch`` (at most 1000 metrics, 100 tags, 100 params per request; params in requests of their own,
each logged once: a different later value is reported and skipped, never costing the rest of a batch). When
the backend fails, records stay buffered (up to ``max_spool_records``) and are written when it is back;
metrics carry their original timestamps, so a batch written twice is stored once. The backend is checked
before training starts; whatever could not be written in the end is counted and reported, never only logged.
"""

from __future__ import annotations

import getpass
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedstream.errors import TrackingError
from fedstream.events import ANALYTICS, ROUND_COMPLETED, Event
from fedstream.server.receiver import JobInfo, JobOutcome, Receiver, ReceiverReport
from fedstream.tracking.records import ARTIFACT, METRIC, PARAM, TAG, Record, check_key, from_wire

log = logging.getLogger(__name__)

MAX_METRICS = 1000
MAX_PARAMS_OR_TAGS = 100
PARENT = ""  # buffer key of the parent run
# MLflow error codes after which the same request may succeed later: keep the records.
TRANSIENT = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
}


@dataclass
class _Run:
    """One MLflow run's pending records, by kind, in arrival order."""

    name: str
    run_id: str = ""
    metrics: deque[Record] = field(default_factory=deque)
    tags: deque[Record] = field(default_factory=deque)
    params: deque[Record] = field(default_factory=deque)
    files: deque[Record] = field(default_factory=deque)
    logged_params: dict[str, str] = field(default_factory=dict)

    def pending(self) -> int:
        return len(self.metrics) + len(self.tags) + len(self.params) + len(self.files)

    def queue(self, kind: str) -> deque[Record]:
        """Where records of ``kind`` wait: metrics, tags and params apart; text and files together."""
        if kind == METRIC:
            return self.metrics
        if kind == TAG:
            return self.tags
        if kind == PARAM:
            return self.params
        return self.files


class MLflowReceiver(Receiver):
    """MLflow tracking on the server.

    Args:
        tracking_uri: ``""`` for an SQLite store in the server's workspace (``mlflow.db``, artifacts in
            ``mlartifacts/``), or any MLflow tracking URI (``http(s)://...``, ``sqlite:///...``,
            ``postgresql://...``). Credentials come from MLflow's own environment variables on the server
            (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``).
        experiment_name: ``""`` uses the job's name.
        experiment_tags: tags of the experiment (``mlflow.note.content`` is its description).
        run_name: prefix of the parent run's name (``""``: the job's name); the job id is appended.
        run_tags: extra tags of the parent run.
        description: the parent run's description (Markdown); ``""`` uses the job's description.
        required: when the backend is unusable at the start, fail the job (``true``) or warn and go on
            without MLflow (``false``).
        flush_interval_s: how often buffered records are written (and sooner when 1000 metrics wait); MLflow's
            cost per metric falls by a third from batches of 300 to batches of 1000.
        http_timeout_s: per-request timeout towards an HTTP tracking server, in whole seconds.
        http_max_retries: MLflow's own retries of one request, before ours.
        max_spool_records: records held while the backend is unreachable; beyond, new records are dropped.
        stop_timeout_s: at the end, how long to keep trying to write what is left.
        events: event names to write: sites' records and the global metrics of each round.
    """

    def __init__(
        self,
        *,
        tracking_uri: str = "",
        experiment_name: str = "",
        experiment_tags: dict[str, str] = {},  # noqa: B006 - never mutated
        run_name: str = "",
        run_tags: dict[str, str] = {},  # noqa: B006 - never mutated
        description: str = "",
        required: bool = True,
        flush_interval_s: float = 2.0,
        http_timeout_s: int = 10,
        http_max_retries: int = 2,
        max_spool_records: int = 1_000_000,
        stop_timeout_s: float = 60.0,
        events: list[str] = ["fed." + ANALYTICS, ROUND_COMPLETED],  # noqa: B006 - never mutated
    ) -> None:
        uri = tracking_uri.strip()
        if uri and ("://" not in uri or uri.startswith("file:")):
            raise ValueError(
                f"tracking_uri {tracking_uri!r}: the file store (./mlruns) is deprecated and refused by MLflow 3; "
                "use '' for an SQLite store in the workspace, 'sqlite:///path/mlflow.db' or 'http://host:port'"
            )
        for name, value in (("flush_interval_s", flush_interval_s), ("http_timeout_s", http_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if http_max_retries < 0 or stop_timeout_s < 0 or max_spool_records < 1:
            raise ValueError("http_max_retries and stop_timeout_s must be >= 0, max_spool_records >= 1")
        self.events = list(events)
        self.tracking_uri = uri
        self.experiment_name = experiment_name
        self.experiment_tags = dict(experiment_tags)
        self.run_name = run_name
        self.run_tags = dict(run_tags)
        self.description = description
        self.required = required
        self.flush_interval_s = flush_interval_s
        self.http_timeout_s = http_timeout_s
        self.http_max_retries = http_max_retries
        self.max_spool_records = max_spool_records
        self.stop_timeout_s = stop_timeout_s
        self._report = ReceiverReport()
        self._runs: dict[str, _Run] = {}
        self._spooled = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._disabled = ""
        self._last_error = ""
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self, job: JobInfo) -> None:
        uri = self.tracking_uri or f"sqlite:///{job.workspace / 'mlflow.db'}"
        self._uri = uri
        self._report.details["tracking_uri"] = uri
        if uri.startswith(("http://", "https://")):
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(self.http_timeout_s)
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.http_max_retries)
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # our log files, not MLflow's stderr
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            self._open(job, uri)
        except Exception as exc:
            reason = f"MLflow tracking at {uri} is not usable: {_describe(exc)}"
            if self.required:
                raise TrackingError(reason + " (set required = false to run without it)") from exc
            log.warning("%s; going on without MLflow (required = false)", reason)
            self._disabled = reason
            self._report.errors.append(reason)
            return
        self._thread = threading.Thread(target=self._flush_loop, name="mlflow-flusher", daemon=True)
        self._thread.start()

    def _open(self, job: JobInfo, uri: str) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        self._client = client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # reachable, authorised, a valid store
        name = self.experiment_name or job.name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
            try:
                experiment_id = client.create_experiment(name, artifact_location=location, tags=self.experiment_tags)
            except MlflowException as exc:  # created meanwhile by another job
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        for key, value in self.experiment_tags.items():
            client.set_experiment_tag(experiment_id, key, value)
        tags = {
            "fedstream.job": job.name,
            "fedstream.job_id": job.id,
            "fedstream.sites": ",".join(job.sites),
            "mlflow.source.name": "fedstream",
            "mlflow.user": _user(),
            **self.run_tags,
        }
        note = self.description or job.description
        if note:
            tags["mlflow.note.content"] = note
        run_name = f"{self.run_name or job.name}-{job.id}"
        parent = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params = [Param(key, value) for key, value in _flatten(job.config).items()]
        for start in range(0, len(params), MAX_PARAMS_OR_TAGS):
            client.log_batch(parent, params=params[start : start + MAX_PARAMS_OR_TAGS])
        self._runs[PARENT] = _Run(run_name, parent)
        self._experiment_id = experiment_id
        self._job = job
        self._report.details.update(
            {
                "experiment_name": name,
                "experiment_id": experiment_id,
                "parent_run_id": parent,
                "parent_run_name": run_name,
                "child_run_ids": {},
                "view": f"mlflow ui --backend-store-uri {uri}"
                if not uri.startswith(("http://", "https://"))
                else f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{parent}",
            }
        )
        log.info("MLflow: experiment %r (%s), parent run %s (%s) at %s", name, experiment_id, run_name, parent, uri)

    def handle(self, event: Event) -> None:
        if event.name == ROUND_COMPLETED:
            summary, now = event.data, time.time()
            records = [Record(METRIC, key, float(value), summary.round, now) for key, value in summary.metrics.items()]
            site = PARENT
        else:
            try:
                records = [from_wire(event.data)]
            except (TypeError, ValueError) as exc:
                with self._cond:
                    self._report.received += 1
                    self._drop(1, f"{event.site}: invalid record: {exc}")
                return
            site = event.site
        with self._cond:
            self._report.received += len(records)
            if self._disabled:
                self._drop(len(records), "")
                return
            if self._spooled + len(records) > self.max_spool_records:
                self._drop(len(records), f"over {self.max_spool_records} records waited for MLflow; new ones dropped")
                return
            run = self._runs.get(site) or self._runs.setdefault(site, _Run(site))
            for record in records:
                run.queue(record.kind).append(record)
            self._spooled += len(records)
            if len(run.metrics) >= MAX_METRICS:
                self._cond.notify_all()

    def stop(self, outcome: JobOutcome) -> None:
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        deadline = time.monotonic() + self.stop_timeout_s
        pause = 0.5
        while self._spooled and not self._flush():
            if time.monotonic() + pause > deadline:
                break
            time.sleep(pause)  # the backend is down: give it a moment before the next try
            pause = min(pause * 2, 5.0)
        if self._spooled:
            lost = self._spooled
            self._drop(lost, f"{lost} records could not be written to {self._uri}: {self._last_error}")
            self._spooled = 0
        status = "FINISHED" if outcome.status == "completed" else "FAILED"
        try:
            parent = self._runs[PARENT].run_id
            for name, path in outcome.models.items():
                if path.is_file():
                    self._client.log_artifact(parent, str(path), artifact_path="models")
                    log.info("MLflow: logged the %s model %s", name, path)
            for run in self._runs.values():
                if run.run_id:
                    self._client.set_terminated(run.run_id, status)
        except Exception as exc:
            self._report.errors.append(f"could not finish the runs: {_describe(exc)}")

    def report(self) -> ReceiverReport:
        return self._report

    # -- writing ------------------------------------------------------------------------------------
    def _flush_loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                if failures:  # the backend failed: back off, whatever piles up meanwhile
                    backoff = min(self.flush_interval_s * 2**failures, max(self.flush_interval_s, 30.0))
                    self._cond.wait_for(lambda: self._stopping, timeout=backoff)
                else:
                    self._cond.wait_for(lambda: self._stopping or self._full(), timeout=self.flush_interval_s)
                if self._stopping:
                    return
            failures = 0 if self._flush() else min(failures + 1, 10)

    def _full(self) -> bool:
        return any(len(run.metrics) >= MAX_METRICS for run in self._runs.values())

    def _flush(self) -> bool:
        """Write everything buffered; ``False`` if the backend is down and records are still waiting.

        A request the backend refuses while it answers otherwise costs only the records it holds (see
        :meth:`_write`); only a backend that does not answer stops the pass, since every run would fail alike.
        """
        with self._cond:
            runs = [run for run in self._runs.values() if run.pending()]
        try:
            for run in runs:
                self._flush_run(run)
        except _BackendDown as down:
            reason = _describe(down.cause)
            if reason != self._last_error:
                log.warning("MLflow at %s failed (%s); holding %d records, retrying", self._uri, reason, self._spooled)
            self._last_error = reason
            return False
        if self._last_error:
            log.info("MLflow at %s is back; buffered records written", self._uri)
            self._last_error = ""
        return True

    def _flush_run(self, run: _Run) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if not run.run_id:
            try:
                self._create_child(run)
            except Exception as exc:
                self._check_refused(exc)
                with self._cond:
                    lost = run.pending()
                    for queue in (run.metrics, run.tags, run.params, run.files):
                        queue.clear()
                    self._spooled -= lost
                self._drop(lost, f"{run.name}: MLflow refused to create the site's run: {_describe(exc)}")
                return
        while run.params:
            with self._cond:
                taken = [run.params[i] for i in range(min(MAX_PARAMS_OR_TAGS, len(run.params)))]
            fresh = self._new_params(run, taken)
            self._write(run, fresh, lambda records: {"params": [Param(r.key, str(r.value)) for r in records]})
            run.logged_params.update((r.key, str(r.value)) for r in fresh)
            self._done(run.params, len(taken))
        while run.metrics or run.tags:
            with self._cond:
                metrics = [run.metrics[i] for i in range(min(MAX_METRICS, len(run.metrics)))]
                tags = [run.tags[i] for i in range(min(MAX_PARAMS_OR_TAGS, len(run.tags)))]
            self._write(
                run,
                metrics + tags,
                lambda records: {
                    "metrics": [
                        Metric(r.key, r.value, int(r.time * 1000), r.step) for r in records if r.kind == METRIC
                    ],
                    "tags": [RunTag(r.key, str(r.value)) for r in records if r.kind == TAG],
                },
            )
            self._done(run.metrics, len(metrics))
            self._done(run.tags, len(tags))
        while run.files:
            record = run.files[0]
            path = record.key if record.kind == ARTIFACT else f"text/{record.key}/step_{record.step}.txt"
            try:
                self._client.log_text(run.run_id, str(record.value), path)
                self._written(1)
            except Exception as exc:
                self._check_refused(exc)
                self._drop(1, f"{run.name}: MLflow refused the text {path!r}: {_describe(exc)}")
            self._done(run.files, 1)

    def _done(self, queue: deque[Record], count: int) -> None:
        """The first ``count`` records of ``queue`` are written or dropped: they leave the spool."""
        with self._cond:
            for _ in range(count):
                queue.popleft()
            self._spooled -= count

    def _new_params(self, run: _Run, records: list[Record]) -> list[Record]:
        """The params among ``records`` not yet logged on ``run``. MLflow keeps a param's first value: the same
        value again counts as written, a different one is dropped and reported (the rest still goes)."""
        fresh: dict[str, Record] = {}
        for record in records:
            value = str(record.value)
            first = run.logged_params.get(record.key, fresh[record.key].value if record.key in fresh else None)
            if first is None:
                fresh[record.key] = record
            elif first == value:
                self._written(1)
            else:
                self._drop(1, f"{run.name}: param {record.key!r} is {first!r}; the new value {value!r} was not logged")
        return list(fresh.values())

    def _write(self, run: _Run, records: list[Record], request: Any, *, retried: bool = False) -> None:
        """``log_batch`` the records. A batch the backend refuses is split until the records it refuses are
        found: they alone are dropped and reported. :class:`_BackendDown` propagates: the caller keeps them."""
        if not records:
            return
        try:
            self._client.log_batch(run.run_id, **request(records))
            self._written(len(records))
        except Exception as exc:
            self._check_refused(exc)
            if len(records) > 1:
                half = len(records) // 2
                self._write(run, records[:half], request)
                self._write(run, records[half:], request)
            elif not retried:  # the backend answers: try once more in case the failure was a passing one
                self._write(run, records, request, retried=True)
            else:
                self._drop(1, f"{run.name}: MLflow refused {records[0].kind} {records[0].key!r}: {_describe(exc)}")

    def _check_refused(self, exc: Exception) -> None:
        """Return if the backend refused this request but still answers; raise :class:`_BackendDown` otherwise.

        MLflow reports a record it cannot store (an SQLite integer overflow, say) with the same
        ``INTERNAL_ERROR`` as a server that is down, so a cheap request tells which it was.
        """
        if not _transient(exc):
            return
        try:
            self._client.get_experiment(self._experiment_id)
        except Exception as probe:
            raise _BackendDown(exc) from probe

    def _create_child(self, run: _Run) -> None:
        tags = {
            "mlflow.parentRunId": self._runs[PARENT].run_id,
            "site": run.name,
            "fedstream.job": self._job.name,
            "fedstream.job_id": self._job.id,
            "mlflow.source.name": "fedstream",
            "mlflow.user": _user(),
        }
        run.run_id = self._client.create_run(self._experiment_id, run_name=run.name, tags=tags).info.run_id
        self._report.details["child_run_ids"][run.name] = run.run_id

    def _written(self, count: int) -> None:
        with self._cond:
            self._report.written += count

    def _drop(self, count: int, reason: str) -> None:
        """Count ``count`` records as lost; the first reasons are kept for the report."""
        with self._cond:
            self._report.dropped += count
            if reason and reason not in self._report.errors and len(self._report.errors) < 20:
                self._report.errors.append(reason)
                log.error("MLflow: %s", reason)


class _BackendDown(Exception):
    """The backend does not answer: every pending record waits for the next try."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, keeping only keys MLflow accepts."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name))
            continue
        try:
            flat[check_key(name)] = str(value)
        except (TypeError, ValueError):
            log.debug("config key %r is not a valid MLflow param name; not logged", name)
    return flat


def _transient(exc: BaseException) -> bool:
    """Would the same request succeed later? Connection trouble and server-side errors: yes."""
    code = getattr(exc, "error_code", None)
    return code is None or code in TRANSIENT


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    code = getattr(exc, "error_code", None)
    if code in {"UNAUTHENTICATED", "PERMISSION_DENIED"}:
        text += " (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, on the server)"
    return text[:400]


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
