"""The folder a run writes to, and its ``result.json``.

::

    WS/
      result.json             status, error, clients, rounds, models, timing (and tracking)
      log.txt                 every process's log records, tagged with their site
      server/
        log.txt               the server's records
        job.toml              the resolved job config that ran
        models/global.pt      the latest global model (torch.load + load_state_dict)
        models/best.pt        the best global model by the key metric
      site-1/
        log.txt               site-1's records, including its trainer's tracebacks

A workspace holds one run. Running again in it first removes what the previous run created (listed in
``.fedstream-workspace``); a non-empty folder that fedstream did not create is refused. Only direct entries
of the folder are ever removed: a listed name that is not a plain file or folder name is skipped, and a
symbolic link is removed itself, never followed.

One fedstream process at a time uses a folder (:func:`exclusive`): a second simulation, server or client
started on a folder in use stops at once, saying which process has it, instead of cleaning or resuming
what the first one is writing.

Site names become folder names here (and run names in the trackers), so :func:`check_site_name` allows
only plain, portable names that cannot collide with the workspace's own entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedstream.errors import ConfigError

log = logging.getLogger(__name__)

MARKER = ".fedstream-workspace"
LOCK = ".fedstream-lock"
RESULT = "result.json"
LOG = "log.txt"
SERVER = "server"
MAX_SITE_NAME = 64
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Names a site cannot take: the workspace's own entries and the server's run in the trackers.
RESERVED_NAMES = frozenset({SERVER, RESULT, RESULT + ".partial", LOG, "jobs"})


def check_site_name(name: object) -> str:
    """``name`` if it is a safe site name: 1-64 ASCII letters, digits, ``-``, ``_`` or ``.``, starting with a
    letter or digit, not one of the workspace's own entries (compared without case, as some file systems do)."""
    if not isinstance(name, str):
        raise ValueError(f"a site name must be a string, got {type(name).__name__}")
    if not name or len(name) > MAX_SITE_NAME or not _SITE_NAME.match(name):
        shown = name if len(name) <= MAX_SITE_NAME else name[:MAX_SITE_NAME] + "..."
        raise ValueError(
            f"bad site name {shown!r}: use 1 to {MAX_SITE_NAME} ASCII letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    if name.lower() in RESERVED_NAMES:
        raise ValueError(f"bad site name {name!r}: it is reserved ({', '.join(sorted(RESERVED_NAMES))})")
    return name


def check_site_names(names: Sequence[str]) -> list[str]:
    """Every name checked with :func:`check_site_name`, and unique even where case is ignored."""
    checked = [check_site_name(name) for name in names]
    seen: dict[str, str] = {}
    repeated = []
    for name in checked:
        if name.lower() in seen:
            repeated.append(name if seen[name.lower()] == name else f"{seen[name.lower()]}/{name}")
        seen.setdefault(name.lower(), name)
    if repeated:
        raise ValueError(f"site names must be unique (ignoring case); repeated: {', '.join(repeated)}")
    return checked


@contextlib.contextmanager
def exclusive(folder: Path, what: str) -> Iterator[None]:
    """Hold ``folder`` (made if missing) for this process while inside; ``what`` names the process for a second
    one (``fedstream server``). The lock is the operating system's (``flock`` on ``.fedstream-lock``), so it
    ends with the process, also a killed one. Raises :class:`ConfigError` naming the holder if it is taken."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError("this is a file, not a folder", file=str(folder))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        raise ConfigError("the folder is not writable by this user", file=str(folder)) from None
    except OSError as exc:
        raise ConfigError(f"cannot use the folder: {exc.strerror}", file=str(folder)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another fedstream process"
            raise ConfigError(
                f"the folder is in use by {holder}; stop that first, or use another folder", file=str(folder)
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{what} (pid {os.getpid()})".encode())
        yield
    finally:
        os.close(fd)  # closing it releases the lock


class Workspace:
    """Paths of one run's outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = root / "server"
        self.result = root / RESULT
        self.log = root / "log.txt"
        self.models = self.server / "models"

    def site(self, name: str) -> Path:
        return self.root / check_site_name(name)

    @classmethod
    def prepare(cls, root: str | os.PathLike[str], sites: Sequence[str]) -> Workspace:
        """Create (or clean and reuse) the workspace folder for a run with ``sites``."""
        folder = Path(root).expanduser().resolve()
        marker = folder / MARKER
        if folder.exists() and not folder.is_dir():
            raise ConfigError("the workspace is a file, not a folder", file=str(folder))
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError("the workspace folder is not writable by this user", file=str(folder))
        if folder.is_dir() and any(entry.name != LOCK for entry in folder.iterdir()):
            if not marker.is_file():
                raise ConfigError(
                    "the workspace folder is not empty and was not made by fedstream; choose a new or empty folder",
                    file=str(folder),
                )
            _remove_entries(folder, marker.read_text().split())
        workspace = cls(folder)
        entries = [SERVER, RESULT, LOG, *check_site_names(sites)]
        try:
            for path in (workspace.server, *(workspace.site(s) for s in sites)):
                path.mkdir(parents=True, exist_ok=True)
            marker.write_text("\n".join(entries) + "\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot create the workspace: {exc.strerror} ({exc.filename})", file=str(folder)
            ) from None
        return workspace

    def write_result(self, data: dict[str, Any]) -> None:
        """Write ``result.json`` atomically."""
        partial = self.result.with_suffix(".json.partial")
        partial.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(partial, self.result)


def _remove_entries(folder: Path, names: list[str]) -> None:
    """Remove the listed direct entries of ``folder``; anything that would reach outside it is skipped."""
    for name in names:
        if name in (".", "..", MARKER, LOCK) or "/" in name or "\\" in name or Path(name).name != name:
            log.warning("workspace %s: not removing %r, which is not an entry of the workspace", folder, name)
            continue
        target = folder / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
