"""Log files of a run: one per site, one for the server, and a combined ``log.txt`` written by all processes.

Every record is tagged with the site it belongs to: the current site while a site runs a task (see
:mod:`fedstream.site.context`), ``server`` in the server process. Worker processes also turn ``print``
output into log records, so user code that prints ends up in its site's log rather than over the progress
display.
"""

from __future__ import annotations

import io
import logging
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fedstream.site.context import current_site_or_none

OPEN_FILES = 32
"""Per-site log files a worker keeps open at once."""
FORMAT = "%(asctime)s %(site)s[%(process)d] %(levelname)s %(name)s: %(message)s"
LOG_FILE = "log.txt"


_make_record = logging.getLogRecordFactory()


def _tag_records(default_site: str) -> None:
    """Give every record a ``site`` attribute: the current site, or ``default_site`` outside of one."""

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = _make_record(*args, **kwargs)
        site = current_site_or_none()
        record.site = site.name if site is not None else default_site
        return record

    logging.setLogRecordFactory(factory)


class _PerSite(logging.Handler):
    """Writes each record to the log file of the site it belongs to.

    A worker may host thousands of sites, more than a process may hold files open (often 1,024), so only the
    :data:`OPEN_FILES` most recently written are kept open; a site's file is opened again when it logs again.
    """

    def __init__(self, paths: dict[str, Path]) -> None:
        super().__init__()
        self.paths = paths
        self.files: OrderedDict[str, logging.Handler] = OrderedDict()
        for path in paths.values():  # every hosted site has its log file from the start
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()

    def emit(self, record: logging.LogRecord) -> None:
        site = getattr(record, "site", "")
        handler = self.files.get(site)
        if handler is None:
            if site not in self.paths:
                return
            handler = self.files[site] = _file(self.paths[site])
            if len(self.files) > OPEN_FILES:
                self.files.popitem(last=False)[1].close()
        self.files.move_to_end(site)
        handler.handle(record)

    def close(self) -> None:
        for handler in self.files.values():
            handler.close()
        super().close()


class _LogStream(io.TextIOBase):
    """A text stream that logs each complete line it is given."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self._logger, self._level, self._partial = logger, level, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._logger.log(self._level, line.rstrip())
        return len(text)


def _file(path: Path, mode: str = "a") -> logging.FileHandler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode=mode, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler


def _reset(default_site: str) -> logging.Logger:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    _tag_records(default_site)
    for noisy in ("urllib3", "alembic", "sqlalchemy", "git", "mlflow", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return root


def setup_server(workspace: Path, console: logging.Handler | None) -> None:
    """Server process: ``<ws>/log.txt`` (combined), ``<ws>/server/log.txt``, and ``console`` if given."""
    root = _reset("server")
    root.addHandler(_file(workspace / LOG_FILE))
    root.addHandler(_file(workspace / "server" / LOG_FILE))
    if console is not None:
        root.addHandler(console)


def setup_receiver(workspace: Path) -> None:
    """A receiver's process: its records go to the server's log files, tagged ``server``."""
    root = _reset("server")
    root.addHandler(_file(workspace / LOG_FILE))
    root.addHandler(_file(workspace / "server" / LOG_FILE))


def setup_worker(workspace: Path, sites: list[str], *, verbose: bool) -> None:
    """Worker process: the combined log, one file per hosted site, stdout/stderr captured as records."""
    root = _reset("worker")
    root.addHandler(_file(workspace / LOG_FILE))
    root.addHandler(_PerSite({site: workspace / site / LOG_FILE for site in sites}))
    if verbose:
        console = logging.StreamHandler(sys.__stderr__)
        console.setFormatter(logging.Formatter("%(site)s %(levelname)s %(name)s: %(message)s"))
        console.setLevel(logging.INFO)
        root.addHandler(console)
    sys.stdout = _LogStream(logging.getLogger("stdout"), logging.INFO)
    sys.stderr = _LogStream(logging.getLogger("stderr"), logging.WARNING)
