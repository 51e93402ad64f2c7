"""Weighted averages accumulated as results arrive: memory of one model, whatever the number of sites."""

from __future__ import annotations

import numpy as np

from fedstream.messages import Weights


class WeightedAverage:
    """Running weighted mean of named arrays, kept in float64 and returned in each array's own dtype."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: Weights, weight: float) -> None:
        """Add one contribution; all contributions must have the same names and shapes."""
        if not weight > 0:
            raise ValueError(f"a contribution's weight must be positive, got {weight}")
        if self._sums and arrays.keys() != self._sums.keys():
            missing = sorted(self._sums.keys() - arrays.keys())
            extra = sorted(arrays.keys() - self._sums.keys())
            raise ValueError(f"weights do not match the model: missing {missing}, unexpected {extra}")
        for name, array in arrays.items():
            scaled = np.multiply(array, weight, dtype=np.float64)
            total = self._sums.get(name)
            if total is None:
                self._sums[name] = scaled
                self._dtypes[name] = array.dtype
            elif total.shape != array.shape:
                raise ValueError(f"{name!r} has shape {array.shape}, expected {total.shape}")
            else:
                total += scaled
        self.total_weight += weight
        self.count += 1

    def result(self) -> Weights:
        """The weighted mean; integer arrays are rounded to the nearest integer."""
        if not self.count:
            raise ValueError("no contributions to average")
        averaged = {}
        for name, total in self._sums.items():
            mean = total / self.total_weight
            dtype = self._dtypes[name]
            averaged[name] = (np.rint(mean) if np.issubdtype(dtype, np.integer) else mean).astype(dtype)
        return averaged


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
