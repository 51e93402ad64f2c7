"""``fedstream new DIR --template NAME``: a job folder from the templates shipped inside the package, so that
``pip install fedstream`` users start from a working job without the repository."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedstream.errors import ConfigError

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
"""The templates: the jobs of the repository's ``jobs/`` folder."""

DEFAULT = "hello-pt-mlflow"


def templates() -> list[str]:
    """The names of the shipped templates."""
    return sorted(path.name for path in TEMPLATES.iterdir() if (path / "job.toml").is_file())


def new_job(folder: str | Path, template: str) -> Path:
    """Write ``template``'s files into ``folder`` (which must not exist, or be empty); returns the folder."""
    names = templates()
    if template not in names:
        raise ConfigError(f"no template {template!r}; the templates are {', '.join(names)}", key="--template")
    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError("already exists and is not an empty folder; choose a new one", file=str(target))
    source = TEMPLATES / template
    try:
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if path.is_file() and path.suffix in (".toml", ".py"):
                shutil.copyfile(path, target / path.name)
    except OSError as exc:
        raise ConfigError(f"cannot write the job folder here: {exc.strerror or exc}", file=str(target)) from None
    return target
