"""CIFAR-10 from its official python layout, without torchvision.

``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` is converted once into ``.npy`` files beside
it, which later loads memory-map; a site reads out only the images it uses (see :meth:`Split.select`). When the
layout is missing it is downloaded from the official address and checked against the official md5 sum;
when that is impossible the error says where to put the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedstream.errors import DataError

log = logging.getLogger(__name__)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES = "cifar-10-batches-py"
CACHE = "cifar-10-batches-npy"
FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Split:
    """Images as uint8 ``(N, 3, 32, 32)`` and labels as int64 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def select(self, indices: np.ndarray) -> Split:
        """A copy holding only the samples at ``indices``.

        From a memory-mapped split the rows are read with plain file reads: touching scattered images of a
        mapping maps whole page-cache folios (up to megabytes per image on current kernels) into the process.
        """
        if isinstance(self.images, np.memmap):
            return Split(_read_rows(self.images, indices), self.labels[indices])
        return Split(np.ascontiguousarray(self.images[indices]), self.labels[indices])


def _read_rows(array: np.memmap, indices: np.ndarray) -> np.ndarray:
    """``array[indices]`` read from ``array``'s file, one read per run of consecutive rows."""
    order = np.argsort(indices, kind="stable")
    rows = np.asarray(indices)[order]
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    if not len(rows):
        return out
    size = out[0].nbytes
    buffer = memoryview(out.reshape(-1).view(np.uint8).data)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    with io.FileIO(str(array.filename), "rb") as fh:
        for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
            fh.seek(array.offset + int(rows[first]) * size)
            fh.readinto(buffer[first * size : last * size])
    result = np.empty_like(out)
    result[order] = out
    return result


def load(root: str | Path, split: str, *, download: bool = True, url: str = URL, md5: str = MD5) -> Split:
    """The ``train`` or ``test`` split under ``root`` (images memory-mapped), downloading it if allowed and needed."""
    root = Path(root).expanduser().resolve()
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    batches = root / BATCHES
    with _lock(root):
        if not all((batches / name).is_file() for name in FILES[split]):
            if not download:
                raise DataError(_missing(batches, "downloading is switched off (data.download = false)"))
            _download(root, url, md5)
        return _cached(root, split)


def _missing(batches: Path, why: str) -> str:
    return (
        f"CIFAR-10 is not at {batches} and {why}. Put the official python layout there "
        f"({', '.join(FILES['train'] + FILES['test'])}), e.g. `tar xzf cifar-10-python.tar.gz -C {batches.parent}`, "
        "or point client.trainer.args.data.root at a folder that holds cifar-10-batches-py "
        "(`--set client.trainer.args.data.root=/path`)."
    )


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(root: Path, url: str, md5: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    log.info("downloading CIFAR-10 from %s to %s", url, archive)
    partial = archive.with_suffix(".gz.partial")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise DataError(_missing(root / BATCHES, f"downloading {url} failed ({exc})")) from exc
    actual = md5sum(partial)
    if actual != md5:
        partial.unlink()
        raise DataError(
            f"{url}: the download has md5 {actual}, expected {md5}; it is corrupt or not the official archive"
        )
    os.replace(partial, archive)
    with tarfile.open(archive) as tar:
        if sys.version_info >= (3, 12) or hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:  # pragma: no cover - old Python without extraction filters
            tar.extractall(root)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")  # the official format is a pickle of a local file
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and {len(labels)}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{path}: labels must be in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _stamp(root: Path, split: str) -> str:
    stats = [(root / BATCHES / name).stat() for name in FILES[split]]
    return json.dumps([[s.st_size, s.st_mtime_ns] for s in stats])


def _cached(root: Path, split: str) -> Split:
    """The split as memory-mapped ``.npy`` files, (re)built when the source batches changed."""
    cache = root / CACHE
    images, labels, stamp = (
        cache / f"{split}_images.npy",
        cache / f"{split}_labels.npy",
        cache / f"{split}.stamp",
    )
    expected = _stamp(root, split)
    if not (stamp.is_file() and stamp.read_text() == expected):
        parts = [_read_batch(root / BATCHES / name) for name in FILES[split]]
        data, targets = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        try:
            cache.mkdir(exist_ok=True)
            for path, array in ((images, data), (labels, targets)):
                with tempfile.NamedTemporaryFile(dir=cache, suffix=".npy", delete=False) as tmp:
                    np.save(tmp, array)
                os.replace(tmp.name, path)
            stamp.write_text(expected)
        except OSError as exc:
            log.warning("cannot cache CIFAR-10 in %s (%s); keeping it in memory", cache, exc)
            return Split(data, targets)
    return Split(np.load(images, mmap_mode="r"), np.load(labels))


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Serialise download and caching between processes sharing ``root`` (a no-op where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / ".fedstream.lock", "a")  # noqa: SIM115 - held for the block
    except OSError:  # read-only data folder: nothing will be written there either
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
