"""Weighted averages accumulated as results arrive (memory of one model, whatever the number of sites), and
the checks a site's weights pass before they count."""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np

from fedstream.errors import JobFailed
from fedstream.messages import Weights

BLOCK = 1 << 16
"""Elements checked, scaled and added at once: the float64 blocks of a contribution and of the sums (512 KB
each, reused) stay in the processor's cache whatever the tensor's size."""


def check_weights(weights: Weights, like: Weights, *, finite: bool = True) -> None:
    """Raise ``ValueError`` unless ``weights`` has exactly ``like``'s names, shapes and dtypes (and, with
    ``finite``, only finite floating-point values). The message names the first problems."""
    missing, extra = sorted(like.keys() - weights.keys()), sorted(weights.keys() - like.keys())
    if missing or extra:
        raise ValueError(f"the weights do not match the model: missing {_few(missing)}, unexpected {_few(extra)}")
    for name, expected in like.items():
        array = weights[name]
        if array.shape != expected.shape:
            raise ValueError(f"{name!r} has shape {array.shape}, the model's is {expected.shape}")
        if array.dtype != expected.dtype:
            raise ValueError(f"{name!r} has dtype {array.dtype}, the model's is {expected.dtype}")
        if finite and np.issubdtype(array.dtype, np.floating):
            flat = array.reshape(-1)  # checked a block at a time: no model-sized temporary
            blocks = (flat[start : start + BLOCK] for start in range(0, flat.size, BLOCK))
            bad = sum(np.count_nonzero(~np.isfinite(block)) for block in blocks)
            if bad:
                raise ValueError(f"{name!r} holds {bad} NaN or infinite value(s)")


def _few(names: list[str]) -> str:
    return str(names[:5])[:-1] + (f", ... {len(names) - 5} more]" if len(names) > 5 else "]")


class WeightedAverage:
    """Running weighted mean of named arrays, kept in float64 and returned in each array's own dtype.

    float64 sums make the average independent of the order in which results arrive (in practice: float32
    rounding of the exact sum), so a job run again gives the same model. They are twice the model's float32
    size, so they live in a temporary file in ``folder`` (no name; made at the first contribution, gone when
    the average is used up), read and written a block at a time: the kernel keeps them in its page cache, or
    on disk when memory runs short, and the process holds two blocks of :data:`BLOCK` elements."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._file: io.RawIOBase | None = None
        self._layout: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}  # byte offset, shape, dtype
        self.total_weight = 0.0
        self.count = 0
        self._used = False
        self._blocks = np.empty((2, BLOCK), np.float64)

    def add(self, arrays: Weights, weight: float) -> None:
        """Add one contribution; all contributions must have the same names and shapes (checked before any
        of it is added)."""
        if not weight > 0:
            raise ValueError(f"a contribution's weight must be positive, got {weight}")
        if self._used:
            raise ValueError("the average was used already")
        if self._layout:
            missing, extra = sorted(self._layout.keys() - arrays.keys()), sorted(arrays.keys() - self._layout.keys())
            if missing or extra:
                raise ValueError(f"weights do not match the model: missing {missing}, unexpected {extra}")
            for name, array in arrays.items():
                if array.shape != self._layout[name][1]:
                    raise ValueError(f"{name!r} has shape {array.shape}, expected {self._layout[name][1]}")
        first = not self._layout
        with self._on_disk():
            if first:  # the first contribution is the sum: nothing to read back
                self._folder.mkdir(parents=True, exist_ok=True)
                file = tempfile.TemporaryFile(dir=self._folder, buffering=0)  # noqa: SIM115 - closed when used up
                self._file = cast(io.RawIOBase, file)
                offset = 0
                for name, array in arrays.items():
                    self._layout[name] = (offset, array.shape, array.dtype)
                    offset += array.size * 8
            scaled, total = self._blocks
            for name, array in arrays.items():
                flat, offset = array.reshape(-1), self._layout[name][0]  # reshape(-1): a view if it can be
                for start in range(0, flat.size, BLOCK):
                    size = min(BLOCK, flat.size - start)
                    np.multiply(flat[start : start + size], weight, out=scaled[:size], dtype=np.float64)
                    if not first:
                        self._read(offset + start * 8, total[:size])
                        scaled[:size] += total[:size]
                    self._write(offset + start * 8, scaled[:size])
        self.total_weight += weight
        self.count += 1

    def result(self) -> Weights:
        """The weighted mean in each array's own dtype, integer arrays rounded to the nearest integer (the
        average is used up)."""
        averaged = {}
        with self._on_disk():
            for name, (offset, shape, dtype) in self._use().items():
                out = np.empty(shape, dtype).reshape(-1)
                total = self._blocks[0]
                for start in range(0, out.size, BLOCK):
                    block = total[: min(BLOCK, out.size - start)]
                    self._read(offset + start * 8, block)
                    if np.issubdtype(dtype, np.integer):
                        block /= self.total_weight
                        out[start : start + block.size] = np.rint(block, out=block)
                    else:  # divided in float64 and cast in one pass
                        np.divide(block, self.total_weight, out=out[start : start + block.size], casting="unsafe")
                averaged[name] = out.reshape(shape)
            self._close()
        return averaged

    def means(self) -> dict[str, np.ndarray]:
        """The weighted means in float64 (the average is used up)."""
        sums = self.sums()
        for total in sums.values():
            total /= self.total_weight
        return sums

    def sums(self) -> dict[str, np.ndarray]:
        """The weighted sums in float64, read into memory (the average is used up)."""
        sums = {}
        with self._on_disk():
            for name, (offset, shape, _) in self._use().items():
                sums[name] = np.empty(shape, np.float64)
                self._read(offset, sums[name].reshape(-1))
            self._close()
        return sums

    @contextlib.contextmanager
    def _on_disk(self) -> Iterator[None]:
        """The job cannot go on without its sums: a disk error (full, say) fails it, naming the folder."""
        try:
            yield
        except OSError as exc:
            raise JobFailed(f"cannot keep the average's sums in {self._folder}: {exc}") from exc

    def _use(self) -> dict[str, tuple[int, tuple[int, ...], np.dtype]]:
        if not self.count:
            raise ValueError("no contributions to average")
        if self._used:
            raise ValueError("the average was used already")
        self._used = True
        return self._layout

    def _read(self, offset: int, into: np.ndarray) -> None:
        assert self._file is not None
        view, done = into.data.cast("B"), 0
        self._file.seek(offset)
        while done < len(view):
            read = self._file.readinto(view[done:])
            if not read:
                raise OSError("its temporary file ended early")
            done += read

    def _write(self, offset: int, data: np.ndarray) -> None:
        assert self._file is not None
        view, done = data.data.cast("B"), 0
        self._file.seek(offset)
        while done < len(view):
            done += self._file.write(view[done:]) or 0

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class MetricAverage:
    """Weighted mean of metric dicts; a key is averaged over the contributions that reported it."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: dict[str, float], weight: float) -> None:
        for key, value in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + value * weight
            self._weights[key] = self._weights.get(key, 0.0) + weight

    def result(self) -> dict[str, float]:
        return {key: self._sums[key] / w for key, w in self._weights.items() if w > 0}
