"""MLflowReceiver against a real tracking server: what the backend refuses costs only itself."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from fedstream.events import Forwarded
from fedstream.server.receiver import JobInfo, JobOutcome
from fedstream.server.receiver_host import ReceiverHost
from fedstream.tracking import MLflowReceiver
from fedstream.tracking.records import METRIC, Record
from tests.faulty_proxy import FaultyProxy
from tests.mlflow_server import MlflowServer

FAILURES: list[str] = []
INTERNAL_ERROR = b'{"error_code": "INTERNAL_ERROR", "message": "cannot store this record"}'


def started(tmp_path: Path, uri: str, **args: object) -> ReceiverHost:
    receiver = MLflowReceiver(
        tracking_uri=uri,
        experiment_name=f"refusals-{tmp_path.name}",
        flush_interval_s=0.05,
        **args,  # type: ignore[arg-type]
    )
    host = ReceiverHost("mlflow", receiver)
    (tmp_path / "server").mkdir()
    host.start(
        JobInfo("refusals", "job-1", "", ("site-1", "site-2"), tmp_path / "server", {"name": "refusals"}),
        FAILURES.append,
    )
    return host


def metric(site: str, key: str, value: float, step: int) -> Forwarded:
    return Forwarded("fed.analytics", site, Record(METRIC, key, value, step, 1_700_000_000.0 + step).to_wire())


def poisoned(path: str, body: bytes) -> tuple[int, bytes] | None:
    """The server's answer to a record it cannot store (say an SQLite overflow): the same 500 INTERNAL_ERROR it
    gives when its database is down."""
    return (500, INTERNAL_ERROR) if path.endswith("/runs/log-batch") and b"poison" in body else None


def test_a_record_the_backend_refuses_costs_only_itself(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    with FaultyProxy(mlflow_server.url, poisoned) as proxy:
        receiver = started(tmp_path, proxy.url, http_max_retries=0, stop_timeout_s=20.0)
        for step in range(500):
            receiver.handle(metric("site-1", "loss", step / 10, step))
            if step == 250:
                receiver.handle(metric("site-1", "poison", 1.0, step))
            receiver.handle(metric("site-2", "loss", step / 5, step))
        receiver.stop(JobOutcome("completed", ""))
    report = receiver.report()
    assert FAILURES == []
    assert (report.received, report.written, report.dropped) == (1001, 1000, 1), report.errors
    assert any("refused metric 'poison'" in error for error in report.errors), report.errors
    client = MlflowClient(mlflow_server.url)
    for site, scale in (("site-1", 10), ("site-2", 5)):
        run_id = report.details["child_run_ids"][site]
        history = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(s, s / scale) for s in range(500)]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert not client.get_metric_history(run_id, "poison")
