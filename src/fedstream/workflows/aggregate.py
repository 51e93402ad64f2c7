"""Weighted averages accumulated as results arrive (memory of one model, whatever the number of sites), and
the checks a site's weights pass before they count."""

from __future__ import annotations

import numpy as np

from fedstream.messages import Weights


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
        if finite and np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise ValueError(f"{name!r} holds {bad} NaN or infinite value(s)")


def _few(names: list[str]) -> str:
    return str(names[:5])[:-1] + (f", ... {len(names) - 5} more]" if len(names) > 5 else "]")


BLOCK = 1 << 16
"""Elements scaled and added at once: the float64 temporary of a contribution (512 KB, reused) stays in the
processor's cache whatever the tensor's size."""


class WeightedAverage:
    """Running weighted mean of named arrays, kept in float64 and returned in each array's own dtype.

    float64 sums make the average independent of the order in which results arrive (in practice: float32
    rounding of the exact sum), so a job run again gives the same model. Memory: the float64 sums (twice the
    model's float32 size) and one reused block of :data:`BLOCK` elements."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0
        self._used = False
        self._block = np.empty(BLOCK, np.float64)

    def add(self, arrays: Weights, weight: float) -> None:
        """Add one contribution; all contributions must have the same names and shapes (checked before any
        of it is added)."""
        if not weight > 0:
            raise ValueError(f"a contribution's weight must be positive, got {weight}")
        if self._used:
            raise ValueError("the average was used already")
        if self._sums:
            missing, extra = sorted(self._sums.keys() - arrays.keys()), sorted(arrays.keys() - self._sums.keys())
            if missing or extra:
                raise ValueError(f"weights do not match the model: missing {missing}, unexpected {extra}")
            for name, array in arrays.items():
                if array.shape != self._sums[name].shape:
                    raise ValueError(f"{name!r} has shape {array.shape}, expected {self._sums[name].shape}")
        for name, array in arrays.items():
            if name not in self._sums:  # the first contribution is the sum: one pass, no zeros to add to
                self._sums[name] = np.multiply(array, weight, dtype=np.float64, order="C")  # reshape(-1): a view
                self._dtypes[name] = array.dtype
                continue
            total, flat = self._sums[name].reshape(-1), array.reshape(-1)
            for start in range(0, flat.size, BLOCK):
                scaled = self._block[: min(BLOCK, flat.size - start)]
                np.multiply(flat[start : start + BLOCK], weight, out=scaled, dtype=np.float64)
                total[start : start + BLOCK] += scaled
        self.total_weight += weight
        self.count += 1

    def result(self) -> Weights:
        """The weighted mean in each array's own dtype, integer arrays rounded to the nearest integer; each sum
        is freed as its mean is made (the average is used up)."""
        sums = self.sums()
        averaged = {}
        for name in list(sums):
            total, dtype = sums.pop(name), self._dtypes[name]
            if np.issubdtype(dtype, np.integer):
                total /= self.total_weight
                averaged[name] = np.rint(total, out=total).astype(dtype)
            else:  # divided in float64 and cast in one pass: a third of the time of dividing, then casting
                out = total if dtype == total.dtype else np.empty(total.shape, dtype)
                averaged[name] = np.divide(total, self.total_weight, out=out, casting="unsafe")
        return averaged

    def means(self) -> dict[str, np.ndarray]:
        """The weighted means in float64, computed in place of the sums (the average is used up)."""
        sums = self.sums()
        for total in sums.values():
            total /= self.total_weight
        return sums

    def sums(self) -> dict[str, np.ndarray]:
        """The weighted sums in float64 (the average is used up)."""
        if not self.count:
            raise ValueError("no contributions to average")
        if self._used:
            raise ValueError("the average was used already")
        sums, self._sums, self._used = self._sums, {}, True
        return sums


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
