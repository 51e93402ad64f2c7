"""Tracking URIs: what is accepted, and the quick check that names why a backend cannot be used."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fedstream.errors import TrackingError
from fedstream.server.receiver import JobInfo
from fedstream.tracking import MLflowReceiver
from fedstream.tracking.mlflow_uri import absolute, check_syntax, check_usable, create_sqlite_store
from tests.helpers import wait_for
from tests.mlflow_server import MlflowServer, free_port


@pytest.mark.parametrize(
    "uri, words",
    [
        ("not a uri", "is not a tracking URI"),
        ("ftp://x", "MLflow cannot track to a 'ftp' URI"),
        ("file:///tmp/mlruns", "names a file store"),
        ("./mlruns", "names a file store"),
        ("mlruns/", "names a file store"),
        ("sqlite://mlflow.db", "an SQLite URI is 'sqlite:///' and a path"),
        ("http://", "names no host"),
        ("s3://bucket", "MLflow cannot track to a 's3' URI"),
    ],
)
def test_uris_fedstream_cannot_use_are_refused_with_what_to_write(uri: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as caught:
        check_syntax(uri)
    assert "sqlite:///" in str(caught.value) or "is 'sqlite:///'" in str(caught.value) or "e.g." in str(caught.value)


@pytest.mark.parametrize(
    "uri",
    ["", "sqlite:///mlflow.db", "sqlite:////abs/m.db", "http://h:5000", "https://h", "postgresql+psycopg2://u@h/db"],
)
def test_usable_uri_forms_pass(uri: str) -> None:
    assert check_syntax(uri) == uri


def test_a_relative_sqlite_path_is_made_absolute_against_the_current_folder() -> None:
    assert absolute("sqlite:///rel/m.db") == f"sqlite:///{Path.cwd() / 'rel' / 'm.db'}"
    assert absolute("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert MLflowReceiver(tracking_uri="sqlite:///x.db").tracking_uri == f"sqlite:///{Path.cwd() / 'x.db'}"


def test_sqlite_stores_need_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        check_usable(f"sqlite:///{tmp_path / 'nowhere' / 'm.db'}", 1)
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        check_usable(f"sqlite:///{tmp_path / 'dir.db'}", 1)
    with pytest.raises(ValueError, match="does not exist"):
        check_usable("sqlite:////proc/nope/m.db", 1)
    with pytest.raises(ValueError, match=r"SQLite cannot write /proc/nope\.db"):
        check_usable("sqlite:////proc/nope.db", 1)  # the folder exists but takes no files
    check_usable(f"sqlite:///{tmp_path / 'm.db'}", 1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_sqlite_stores_need_a_writable_folder(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            check_usable(f"sqlite:///{tmp_path / 'm.db'}", 1)
    finally:
        tmp_path.chmod(0o700)


def test_a_real_tracking_server_passes_and_a_closed_port_is_named(mlflow_server: MlflowServer) -> None:
    check_usable(mlflow_server.url, 5)
    with pytest.raises(ValueError, match=r"nothing listens there \(connection refused\)"):
        check_usable(f"http://127.0.0.1:{free_port()}", 5)
    with pytest.raises(ValueError, match="cannot be resolved"):
        check_usable("http://no-such-host.invalid:5000", 5)


@pytest.fixture
def answering() -> Iterator[list[tuple[int, bytes, dict[str, str]]]]:
    """An HTTP server on 127.0.0.1 that gives the answers the test puts in the list, and records headers."""
    answers: list[tuple[int, bytes, dict[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body, _ = answers[0]
            answers.append((0, b"", dict(self.headers)))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answers.append((0, b"", {"url": f"http://127.0.0.1:{server.server_address[1]}"}))
    yield answers
    server.shutdown()
    server.server_close()


def test_http_answers_are_named(
    answering: list[tuple[int, bytes, dict[str, str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = answering.pop()[2]["url"]
    for status, body, words in [
        (401, b"", "refused our credentials (HTTP 401); set MLFLOW_TRACKING_USERNAME"),
        (403, b"", "refused our credentials (HTTP 403)"),
        (404, b"", "no MLflow tracking API at this address"),
        (500, b"", "answered HTTP 500"),
        (200, b"<html>hello</html>", "not as an MLflow tracking server"),
    ]:
        answering[:] = [(status, body, {})]
        with pytest.raises(ValueError, match=re.escape(words)):
            check_usable(url, 5)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    answering[:] = [(200, json.dumps({"experiments": []}).encode(), {})]
    check_usable(url, 5)
    headers = answering[1][2]
    assert headers["Authorization"] == "Basic YWxpY2U6c2VjcmV0", "MLflow's own credentials are sent"


def test_a_database_without_its_driver_is_named() -> None:
    with pytest.raises(ValueError, match=r"driver is not installed.*pip install psycopg2-binary"):
        check_usable("postgresql://user@127.0.0.1/db", 1)


def test_the_receiver_reports_an_unusable_backend_before_training(tmp_path: Path) -> None:
    job = JobInfo("j", "1", "", ("a",), tmp_path, {})
    receiver = MLflowReceiver(tracking_uri=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TrackingError, match=r"is not usable: nothing listens there.*set required = false"):
        receiver.check(job)
    optional = MLflowReceiver(tracking_uri=f"http://127.0.0.1:{free_port()}", required=False)
    optional.check(job)
    assert optional.problems and "nothing listens there" in optional.problems[0]


def test_an_sqlite_store_is_in_place_only_once_it_is_whole(tmp_path: Path) -> None:
    # MLflow makes a store's tables in many steps; a process killed among them must not leave a broken store.
    folder = tmp_path / "store"
    folder.mkdir()
    path = folder / "mlflow.db"
    code = f"import pathlib, fedstream.tracking.mlflow_uri as u; u.create_sqlite_store(pathlib.Path({str(path)!r}))"
    child = subprocess.Popen([sys.executable, "-c", code])
    wait_for(lambda: any(folder.glob("mlflow.db.*.partial")) or child.poll() is not None, "the store to be begun")
    child.kill()
    child.wait()
    assert not path.exists(), "killed while making it: no store at all"
    path.touch()  # what the server's check of the folder leaves
    create_sqlite_store(path)
    create_sqlite_store(path)  # there: left as it is
    experiments = MlflowClient(f"sqlite:///{path}").search_experiments()
    assert [experiment.name for experiment in experiments] == ["Default"]
    ours = {p.name for p in folder.iterdir() if f".{child.pid}." not in p.name}
    assert ours == {"mlflow.db"}, "nothing left beside it but what the killed process was making"
