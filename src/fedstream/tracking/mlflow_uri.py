"""MLflow tracking URIs: which ones fedstream takes, and a quick check that one can be used.

The check runs on the server before training, without importing MLflow (which takes seconds): the folder of
an SQLite store exists and is writable, an HTTP tracking server answers its REST API with the credentials
MLflow would send, a database URI has its driver installed. Each problem is named in words a user can act
on; MLflow's own errors for these cases are far from it (a file-store deprecation notice for a typo, a
model-registry error for an unknown scheme, a bare ``ModuleNotFoundError`` for a missing driver).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import sqlite3
import ssl
import urllib.error
import urllib.request
from pathlib import Path

SQL_SCHEMES = ("postgresql", "mysql", "mssql")
DRIVERS = {"postgresql": "psycopg2-binary", "mysql": "pymysql (with mysql+pymysql://)", "mssql": "pyodbc"}
CREDENTIALS_HINT = (
    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, in the server's environment"
)


def check_syntax(uri: str) -> str:
    """``uri`` if fedstream can use it as a tracking URI; ``ValueError`` naming what to write instead."""
    if not uri:
        return uri
    use = "use '' (an SQLite store), 'sqlite:///path/mlflow.db', 'http(s)://host:port' or 'postgresql://...'"
    scheme, sep, rest = uri.partition("://")
    if uri.startswith("file:") or (not sep and ("/" in uri or uri.startswith("."))):
        raise ValueError(f"{uri!r} names a file store (./mlruns), which MLflow 3 refuses; {use}")
    if not sep:
        raise ValueError(f"{uri!r} is not a tracking URI; {use}")
    base = scheme.split("+")[0]
    if base not in ("sqlite", "http", "https", "databricks", *SQL_SCHEMES):
        raise ValueError(f"{uri!r}: MLflow cannot track to a {scheme!r} URI; {use}")
    if base == "sqlite" and not rest.startswith("/"):
        raise ValueError(f"{uri!r}: an SQLite URI is 'sqlite:///' and a path, e.g. 'sqlite:///mlflow.db'")
    if base in ("http", "https") and not rest.split("/")[0]:
        raise ValueError(f"{uri!r} names no host; e.g. 'http://127.0.0.1:5000'")
    return uri


def default_uri() -> str:
    """MLflow's own default: ``MLFLOW_TRACKING_URI`` if set, else ``mlflow.db`` in the current folder (what a
    plain ``mlflow ui`` started there shows)."""
    variable = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not variable:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    try:
        return absolute(check_syntax(variable))
    except ValueError as exc:
        raise ValueError(f"MLFLOW_TRACKING_URI: {exc}") from None


def absolute(uri: str) -> str:
    """``uri`` with a relative SQLite path made absolute against the current directory (as MLflow reads it)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def check_usable(uri: str, timeout_s: float) -> None:
    """Raise ``ValueError`` (the reason) if the tracking backend at ``uri`` cannot be used."""
    base = uri.partition("://")[0].split("+")[0]
    if base == "sqlite":
        _check_sqlite(Path(uri.removeprefix("sqlite:///")))
    elif base in ("http", "https"):
        _check_http(uri.rstrip("/"), timeout_s)
    elif base in SQL_SCHEMES:
        _check_driver(uri, base)


def create_sqlite_store(path: Path) -> None:
    """Create MLflow's SQLite store at ``path`` if there is none yet, whole or not at all.

    MLflow makes a new store's tables in dozens of steps (its migrations, seconds in all), and a process
    killed meanwhile (a server stopped with ``kill -9`` while its first job starts) would leave a store that
    no later run can open ("table _alembic_tmp_experiments already exists"). So the store is made under a
    temporary name beside ``path`` and linked into place once complete, never over a store another process
    made meanwhile. An empty file (what a check of the folder leaves) counts as none.
    """
    if path.exists() and path.stat().st_size:
        return
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    leftovers = [partial, partial.with_name(partial.name + "-journal")]  # SQLite's own journal beside it
    for leftover in leftovers:  # of a killed process that had this id: a stale journal would be rolled back
        leftover.unlink(missing_ok=True)
    try:
        store = SqlAlchemyStore(f"sqlite:///{partial}", DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)  # type: ignore[no-untyped-call]
        store.engine.dispose()
        if path.exists() and not path.stat().st_size:
            os.replace(partial, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(partial, path)
    finally:
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)


def _check_sqlite(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"the folder {folder} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an SQLite file")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ValueError(f"{path} cannot be read and written by this user")
    if not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"the folder {folder} is not writable by this user")
    try:  # what the permissions do not tell: a file system that refuses files, a database that is locked
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.rollback()
    except sqlite3.Error as exc:
        raise ValueError(f"SQLite cannot write {path}: {exc}") from None


def _check_http(uri: str, timeout_s: float) -> None:
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    elif token:
        request.add_header("Authorization", f"Bearer {token}")
    context = None
    if uri.startswith("https://"):
        insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
        context = (
            ssl._create_unverified_context()
            if insecure
            else ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)
        )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            body = response.read(65536)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ValueError(f"the server refused our credentials (HTTP {exc.code}); {CREDENTIALS_HINT}") from None
        if exc.code == 404:
            raise ValueError("no MLflow tracking API at this address (HTTP 404)") from None
        raise ValueError(f"the server answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ValueError(_network_reason(exc.reason, timeout_s)) from None
    except TimeoutError:
        raise ValueError(f"no answer within {timeout_s:g} s (http_timeout_s)") from None
    try:
        json.loads(body or b"{}")
    except ValueError:
        raise ValueError("the address answers, but not as an MLflow tracking server (not JSON)") from None


def _network_reason(reason: object, timeout_s: float) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "nothing listens there (connection refused); is the tracking server running?"
    if isinstance(reason, socket.gaierror):
        return f"the host name cannot be resolved ({reason.strerror})"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g} s (http_timeout_s)"
    if isinstance(reason, ssl.SSLCertVerificationError):
        return (
            f"its TLS certificate is not trusted ({reason.verify_message}); set MLFLOW_TRACKING_SERVER_CERT_PATH "
            "to the CA that signed it"
        )
    return f"cannot connect ({reason})"


def _check_driver(uri: str, base: str) -> None:
    try:
        import sqlalchemy
    except ImportError:
        raise ValueError("database URIs need sqlalchemy: pip install 'fedstream[tracking]'") from None
    try:
        sqlalchemy.create_engine(uri)  # loads the driver, connects to nothing
    except ImportError as exc:
        raise ValueError(f"the database driver is not installed ({exc}); pip install {DRIVERS[base]}") from None
    except Exception as exc:  # a malformed URI
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
