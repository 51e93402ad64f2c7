"""Job folders as gzipped tar archives: what an admin submits (and signs), what sites receive, and a job's
outputs as an admin downloads them.

A folder is packed as ``simulate`` sees it: symbolic links are followed (each folder once), caches are left
out. Archives are unpacked with tarfile's ``data`` filter: an entry that would land outside the folder, a
link or a device is refused.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fedstream.errors import ConfigError

MAX_JOB_BYTES = 64 * 1024**2
"""The largest job archive a server takes; a folder with over four times as many bytes of files is refused
before it is packed (a data set inside it)."""


def pack_job(folder: Path, limit: int = 0) -> bytes:
    """The job folder as a gzipped tar, in memory. With ``limit``, a folder whose files hold over four times
    that many bytes is refused as soon as that is known."""
    buffer = io.BytesIO()
    pack(folder, buffer, limit)
    return buffer.getvalue()


def pack(folder: Path, out: BinaryIO, limit: int = 0) -> None:
    """Write the folder as a gzipped tar into ``out`` (a job's outputs go to a temporary file: models are
    large); ``limit`` as for :func:`pack_job`."""
    size = 0
    with tarfile.open(fileobj=out, mode="w:gz", dereference=True) as archive:
        for path in _files(folder):
            size += path.stat().st_size
            if limit and size > 4 * limit:
                raise ConfigError(
                    f"the job folder holds over {4 * limit // 2**20} MiB ({path.relative_to(folder)} among it); "
                    "keep data sets and checkpoints out of it",
                    file=str(folder),
                )
            archive.add(path, arcname=str(path.relative_to(folder)), recursive=False)


def _files(folder: Path) -> Iterator[Path]:
    """The files of a folder, in order, through symbolic links (each folder once), without caches."""
    seen: set[str] = set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back to a folder walked already
            folders.clear()
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if name not in {"__pycache__", ".git"})
        for name in sorted(files):
            path = Path(root) / name
            if not name.endswith(".pyc") and path.is_file():
                yield path


def unpack_job(source: bytes | BinaryIO, folder: Path) -> None:
    """Extract an archive (its bytes, or a file positioned at its start) into ``folder``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the folder: {exc.strerror}", file=str(folder)) from None
    try:
        with tarfile.open(fileobj=io.BytesIO(source) if isinstance(source, bytes) else source, mode="r:gz") as archive:
            archive.extractall(folder, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConfigError(f"the job archive is unusable: {exc}") from None


def job_folder_name(name: object) -> str:
    """The job folder's own name (a job without ``name`` in job.toml is called after its folder), if safe."""
    return (
        name
        if isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        else "job"
    )
