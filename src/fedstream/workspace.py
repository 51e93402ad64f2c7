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
``.fedstream-workspace``); a non-empty folder that fedstream did not create is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedstream.errors import ConfigError

MARKER = ".fedstream-workspace"
RESULT = "result.json"


class Workspace:
    """Paths of one run's outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = root / "server"
        self.result = root / RESULT
        self.log = root / "log.txt"
        self.models = self.server / "models"

    def site(self, name: str) -> Path:
        return self.root / name

    @classmethod
    def prepare(cls, root: str | os.PathLike[str], sites: Sequence[str]) -> Workspace:
        """Create (or clean and reuse) the workspace folder for a run with ``sites``."""
        folder = Path(root).expanduser().resolve()
        marker = folder / MARKER
        if folder.exists() and not folder.is_dir():
            raise ConfigError("the workspace is a file, not a folder", file=str(folder))
        if folder.is_dir() and any(folder.iterdir()):
            if not marker.is_file():
                raise ConfigError(
                    "the workspace folder is not empty and was not made by fedstream; choose a new or empty folder",
                    file=str(folder),
                )
            for name in marker.read_text().split():
                target = folder / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
        workspace = cls(folder)
        entries = ["server", RESULT, "log.txt", *sites]
        for path in (workspace.server, *(workspace.site(s) for s in sites)):
            path.mkdir(parents=True, exist_ok=True)
        marker.write_text("\n".join(entries) + "\n")
        return workspace

    def write_result(self, data: dict[str, Any]) -> None:
        """Write ``result.json`` atomically."""
        partial = self.result.with_suffix(".json.partial")
        partial.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(partial, self.result)
