"""Write sites' tracking records and the global metrics to MLflow, from the server only.

Run layout: one experiment (default: the job's name); one parent run per job, named ``<run_name>-<job id>``,
with the resolved job config as params, the global metrics of every round (step = round) and the final and
best models as artifacts; one child run per site (run name = site, tag ``site``), created when the site's
first record arrives, with the same metric keys on every site so the MLflow UI overlays them.

Records keep the site's step and timestamp. The receiver base hands them over in batches; they are grouped
by run and written with ``log_batch`` (at most 1000 metrics, 100 tags, 100 params per request; params in
requests of their own, each logged once: a different later value is reported and skipped). A request the
backend refuses while it still answers is split until the refused records are found, and only they are
dropped and reported; while the backend does not answer, records wait and are written when it is back.
Metrics carry their original timestamps, so a batch written twice is stored once.
"""

from __future__ import annotations

import getpass
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedstream.errors import TrackingError
from fedstream.events import Event, Forwarded
from fedstream.server.receiver import BackendUnavailable, JobInfo, JobOutcome, Receiver
from fedstream.tracking.cross_site_report import heat_map_png, matrix_csv
from fedstream.tracking.mlflow_uri import absolute, check_syntax, check_usable, create_sqlite_store, default_uri
from fedstream.tracking.records import ARTIFACT, FED_ANALYTICS, METRIC, PARAM, TAG, Record, check_key, from_wire
from fedstream.workflows.base import RoundCompleted
from fedstream.workflows.cross_site import CrossSiteEvaluated, CrossSiteMatrix

log = logging.getLogger(__name__)

ARTIFACTS_SCHEME = "mlflow-artifacts:/"
MAX_METRICS = 1000
MAX_PARAMS_OR_TAGS = 100
PARENT = ""  # the parent run's key among the runs
# MLflow error codes after which the same request may succeed later.
TRANSIENT = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
}
STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

Item = tuple[int, Record]  # a record and the index of the event it came from


@dataclass
class _Run:
    """One MLflow run, where its artifacts go, and the params it already holds."""

    name: str
    run_id: str = ""
    artifact_uri: str = ""
    logged_params: dict[str, str] = field(default_factory=dict)


class _Down(Exception):
    """The backend does not answer."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(_describe(cause))


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
        flush_interval_s: how long records may wait for a fuller batch (MLflow's cost per metric falls by a
            third from batches of 300 to batches of 1000).
        http_timeout_s: per-request timeout towards an HTTP tracking server, in whole seconds.
        http_max_retries: MLflow's own retries of one request, before ours.
        max_spool_records: records held while MLflow is slower than the sites (then the sites slow down) or
            unreachable (then new records are dropped and counted).
        stop_timeout_s: at the end, how long to keep trying to write what is left.
        events: event names to write: sites' records, the global metrics of each round and the cross-site
            evaluation (metrics ``cross_site/<model>/<site>/<metric>``, a CSV and a heat map on the parent run).
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
        events: list[str] = [FED_ANALYTICS, RoundCompleted.name, CrossSiteEvaluated.name],  # noqa: B006
    ) -> None:
        uri = absolute(check_syntax(tracking_uri.strip()))
        if not http_timeout_s > 0 or http_max_retries < 0:
            raise ValueError("http_timeout_s must be positive and http_max_retries 0 or more")
        super().__init__(
            events=events,
            batch_size=10_000,
            flush_interval_s=flush_interval_s,
            max_pending=max_spool_records,
            stop_timeout_s=stop_timeout_s,
        )
        self.tracking_uri = uri
        self.experiment_name = experiment_name
        self.experiment_tags = dict(experiment_tags)
        self.run_name = run_name
        self.run_tags = dict(run_tags)
        self.description = description
        self.required = required
        self.http_timeout_s = http_timeout_s
        self.http_max_retries = http_max_retries
        self._runs: dict[str, _Run] = {}
        self._disabled = ""
        self._uri = uri

    # -- Receiver -----------------------------------------------------------------------------------------------
    def check(self, job: JobInfo) -> None:
        try:
            self._uri = uri = self.tracking_uri or default_uri()
        except ValueError as exc:
            raise TrackingError(str(exc)) from None
        self.details["tracking_uri"] = uri
        try:
            check_usable(uri, self.http_timeout_s)
        except ValueError as exc:
            self._unusable(str(exc))

    def open(self, job: JobInfo) -> None:
        if self._disabled:
            return
        uri = self._uri
        if uri.startswith(("http://", "https://")):
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(self.http_timeout_s)
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.http_max_retries)
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # our log files, not MLflow's stderr
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            self._open(job, uri)
        except Exception as exc:
            self._unusable(_describe(exc))

    def _unusable(self, reason: str) -> None:
        """The backend cannot be used: fail the job, or, with ``required = false``, go on without MLflow."""
        message = f"MLflow tracking at {self._uri} is not usable: {reason}"
        if self.required:
            raise TrackingError(message + " (set required = false to run without it)")
        log.warning("%s; going on without MLflow (required = false)", message)
        self._disabled = message
        self.note(message)

    def write(self, events: Sequence[Event]) -> None:
        if self._disabled:
            self.refuse(len(events), "")
            return
        runs: dict[str, list[Item]] = {}
        for index, event in enumerate(events):
            if isinstance(event, RoundCompleted):
                summary = event.summary
                records = [
                    Record(METRIC, k, float(v), summary.round, summary.ended_at) for k, v in summary.metrics.items()
                ]
                runs.setdefault(PARENT, []).extend((index, record) for record in records)
            elif isinstance(event, CrossSiteEvaluated):
                try:
                    self._cross_site(event.matrix)
                except Exception as exc:  # the metrics below still go in
                    log.warning("MLflow: the cross-site evaluation's files were not stored: %s", exc)
                    self.note(f"cross-site evaluation files not stored: {_describe(exc)}")
                records = [
                    Record(METRIC, f"cross_site/{model}/{site}/{key}", float(value), 0, time.time())
                    for model, by_site in event.matrix.metrics.items()
                    for site, metrics in by_site.items()
                    for key, value in metrics.items()
                ]
                runs.setdefault(PARENT, []).extend((index, record) for record in records)
            elif isinstance(event, Forwarded):
                try:
                    record = from_wire(event.data)
                except (TypeError, ValueError) as exc:
                    self.refuse(1, f"{event.site}: invalid record: {exc}")
                    continue
                runs.setdefault(event.site, []).append((index, record))
            else:
                self.refuse(1, f"cannot write a {event.name!r} event")
        self._refused: set[int] = set()
        done: set[int] = set()
        for name, items in runs.items():
            try:
                self._write_run(self._runs.get(name) or self._runs.setdefault(name, _Run(name)), items)
            except _Down as down:
                unfinished = {index for run_items in runs.values() for index, _ in run_items} - done - self._refused
                raise BackendUnavailable(
                    f"MLflow at {self._uri} does not answer: {down}", [events[i] for i in sorted(unfinished)]
                ) from down
            done.update(index for index, _ in items)

    def _cross_site(self, matrix: CrossSiteMatrix) -> None:
        """The matrix's files on the parent run: every value as CSV, the key metric as a heat map."""
        run = self._runs[PARENT]
        self._store_file(run, "cross_site_eval/matrix.csv", matrix_csv(matrix).encode())
        picture = heat_map_png(matrix)
        if picture is not None:
            self._store_file(run, f"cross_site_eval/{matrix.key_metric}.png", picture)

    def close(self, outcome: JobOutcome) -> None:
        if self._disabled or PARENT not in self._runs:
            return
        try:
            for name, path in outcome.models.items():
                if path.is_file():
                    self._store_file(self._runs[PARENT], f"models/{name}.pt", path.read_bytes())
                    log.info("MLflow: logged the %s model %s", name, path)
            for run in self._runs.values():
                if run.run_id:
                    self._client.set_terminated(run.run_id, STATUS.get(outcome.status, "FAILED"))
        except Exception as exc:
            self.note(f"could not finish the runs: {_describe(exc)}")

    # -- opening ------------------------------------------------------------------------------------------------
    def _open(self, job: JobInfo, uri: str) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        if uri.startswith("sqlite:"):
            create_sqlite_store(Path(uri.removeprefix("sqlite:///")))
        self._client = client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # reachable, authorised, a valid store
        name = self.experiment_name or job.name
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # A store on this machine keeps artifacts beside it, named the way `mlflow ui` serves them, so that
            # the folder can be moved or copied; a tracking server chooses for itself.
            location = f"{ARTIFACTS_SCHEME}{secrets.token_hex(8)}" if uri.startswith("sqlite:") else None
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
        self._job, self._experiment_id = job, experiment_id
        self.details["child_run_ids"] = {}
        parent = self._continue(client, experiment_id, job.id)
        if not parent:
            parent = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
            params = [Param(key, value) for key, value in _flatten(job.config).items()]
            for start in range(0, len(params), MAX_PARAMS_OR_TAGS):
                client.log_batch(parent, params=params[start : start + MAX_PARAMS_OR_TAGS])
        self._runs[PARENT] = _Run(run_name, parent)
        self.details.update(
            {
                "experiment_name": name,
                "experiment_id": experiment_id,
                "parent_run_id": parent,
                "parent_run_name": run_name,
                "view": _view(uri, experiment_id, parent),
            }
        )
        log.info("MLflow: experiment %r (%s), parent run %s (%s) at %s", name, experiment_id, run_name, parent, uri)

    # -- writing ------------------------------------------------------------------------------------------------
    def _write_run(self, run: _Run, items: list[Item]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if not run.run_id:
            try:
                self._create_child(run)
            except _Down:
                raise
            except Exception as exc:
                self._check_refused(exc)
                self._refuse_items(items, f"{run.name}: MLflow refused to create the site's run: {_describe(exc)}")
                return
        params = [item for item in items if item[1].kind == PARAM]
        for start in range(0, len(params), MAX_PARAMS_OR_TAGS):
            fresh = self._new_params(run, params[start : start + MAX_PARAMS_OR_TAGS])
            self._log(run, fresh, lambda chunk: {"params": [Param(r.key, str(r.value)) for _, r in chunk]})
            run.logged_params.update((r.key, str(r.value)) for _, r in fresh)
        metrics = [item for item in items if item[1].kind == METRIC]
        tags = [item for item in items if item[1].kind == TAG]
        while metrics or tags:
            chunk = metrics[:MAX_METRICS] + tags[:MAX_PARAMS_OR_TAGS]
            metrics, tags = metrics[MAX_METRICS:], tags[MAX_PARAMS_OR_TAGS:]
            self._log(
                run,
                chunk,
                lambda part: {
                    "metrics": [
                        Metric(r.key, float(r.value), int(r.time * 1000), r.step) for _, r in part if r.kind == METRIC
                    ],
                    "tags": [RunTag(r.key, str(r.value)) for _, r in part if r.kind == TAG],
                },
            )
        for index, record in items:
            if record.kind in (METRIC, TAG, PARAM):
                continue
            path = record.key if record.kind == ARTIFACT else f"text/{record.key}/step_{record.step}.txt"
            try:
                self._store_file(run, path, str(record.value).encode())
            except Exception as exc:
                self._check_refused(exc)
                self._refuse_items([(index, record)], f"{run.name}: MLflow refused the text {path!r}: {_describe(exc)}")

    def _new_params(self, run: _Run, items: list[Item]) -> list[Item]:
        """The params among ``items`` not yet logged on ``run``. MLflow keeps a param's first value: the same
        value again is already written, a different one is refused and reported (the rest still goes)."""
        fresh: dict[str, Item] = {}
        for index, record in items:
            value = str(record.value)
            first = run.logged_params.get(record.key, str(fresh[record.key][1].value) if record.key in fresh else None)
            if first is None:
                fresh[record.key] = (index, record)
            elif first != value:
                self._refuse_items(
                    [(index, record)],
                    f"{run.name}: param {record.key!r} is {first!r}; the new value {value!r} was not logged",
                )
        return list(fresh.values())

    def _log(
        self, run: _Run, items: list[Item], request: Callable[[list[Item]], dict[str, Any]], *, retried: bool = False
    ) -> None:
        """``log_batch`` the records. A batch the backend refuses is split until the records it refuses are
        found: they alone are refused. :class:`_Down` propagates: the caller keeps the records."""
        if not items:
            return
        try:
            self._client.log_batch(run.run_id, **request(items))
        except Exception as exc:
            self._check_refused(exc)
            if len(items) > 1:
                half = len(items) // 2
                self._log(run, items[:half], request)
                self._log(run, items[half:], request)
            elif not retried:  # the backend answers: try once more in case the failure was a passing one
                self._log(run, items, request, retried=True)
            else:
                record = items[0][1]
                self._refuse_items(items, f"{run.name}: MLflow refused {record.kind} {record.key!r}: {_describe(exc)}")

    def _check_refused(self, exc: Exception) -> None:
        """Return if the backend refused this request but still answers; raise :class:`_Down` otherwise.

        MLflow reports a record it cannot store (an SQLite integer overflow, say) with the same
        ``INTERNAL_ERROR`` as a server that is down, so a cheap request tells which it was.
        """
        if not _transient(exc):
            return
        try:
            self._client.get_experiment(self._experiment_id)
        except Exception:
            raise _Down(exc) from exc

    def _refuse_items(self, items: list[Item], reason: str) -> None:
        """Refuse the events behind ``items``, each once."""
        events = {index for index, _ in items} - self._refused
        self._refused |= events
        if events:
            self.refuse(len(events), reason)

    def _store_file(self, run: _Run, path: str, content: bytes) -> None:
        """Store ``content`` as the artifact ``path`` of ``run``: beside a store on this machine (where
        `mlflow ui` looks for ``mlflow-artifacts:`` locations), through MLflow otherwise."""
        if not run.artifact_uri:
            run.artifact_uri = self._client.get_run(run.run_id).info.artifact_uri
        if run.artifact_uri.startswith(ARTIFACTS_SCHEME) and self._uri.startswith("sqlite:"):
            root = Path(self._uri.removeprefix("sqlite:///")).parent / "mlartifacts"
            target = root / run.artifact_uri.removeprefix(ARTIFACTS_SCHEME) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            return
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / Path(path).name
            local.write_bytes(content)
            self._client.log_artifact(
                run.run_id, str(local), artifact_path=str(Path(path).parent) if "/" in path else None
            )

    def _continue(self, client: Any, experiment_id: str, job_id: str) -> str:
        """The parent run of a job that resumes after a server restart (its runs go on, with their ids and
        params); ``""`` for a new job."""
        runs = client.search_runs([experiment_id], f"tags.`fedstream.job_id` = '{job_id}'", max_results=10_000)
        parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
        if not parents:
            return ""
        for run in runs:
            client.update_run(run.info.run_id, status="RUNNING")
            if "mlflow.parentRunId" in run.data.tags:
                site = run.data.tags.get("site", run.info.run_name)
                self._runs[site] = _Run(site, run.info.run_id, logged_params=dict(run.data.params))
                self.details["child_run_ids"][site] = run.info.run_id
        log.info("MLflow: the job's runs continue after a restart of the server")
        return str(parents[0].info.run_id)

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
        self.details["child_run_ids"][run.name] = run.run_id


def _view(uri: str, experiment_id: str, run_id: str) -> str:
    """How to look at the runs: the run's page on a tracking server, or `mlflow ui` where the store is."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        store = "" if path.name == "mlflow.db" else f" --backend-store-uri sqlite:///{path.name}"
        return f"cd {path.parent} && mlflow ui{store}"
    return f"mlflow ui --backend-store-uri {uri}"


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
