"""SCAFFOLD (Karimireddy et al., 2020): sites correct their local gradients with control variates, which
removes the drift FedAvg suffers on heterogeneous data.

The server keeps a control variate ``c`` (one array per floating-point array of the model, zero at first)
and sends it with every train task as the extra group ``scaffold_c``. A site trains with corrected gradients
``g + c - c_i``, updates its own ``c_i`` (option II of the paper) and returns the change as
``scaffold_delta_c`` (:class:`fedstream.pt.algorithms.ScaffoldState` does the site's part). The server averages
the models as FedAvg does (weighted by samples; a global learning rate of 1) and sets
``c = c + sum(delta_c_i) / N`` over the round's sites, ``N`` being all the job's sites.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedstream.messages import Payload, Result, Weights
from fedstream.workflows.aggregate import WeightedAverage, check_weights
from fedstream.workflows.fedavg import FedAvg, RoundUpdate

SCAFFOLD_C = "scaffold_c"
"""The extra group of a train task holding the server's control variate."""

SCAFFOLD_DELTA_C = "scaffold_delta_c"
"""The extra group of a training result holding the site's control-variate change."""


class Scaffold(FedAvg):
    """FedAvg with SCAFFOLD's control variates; takes every argument of :class:`~fedstream.workflows.FedAvg`.

    Memory on the server: the model's average, ``c``, and the running sum of the sites' changes to it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.control: Weights = {}

    def train_payload(self, weights: Weights) -> Payload:
        if not self.control:
            self.control = {
                name: np.zeros_like(array) for name, array in weights.items() if np.issubdtype(array.dtype, np.floating)
            }
        return Payload(weights, extra={SCAFFOLD_C: self.control})

    def round_update(self, weights: Weights, sites: Sequence[str], scratch: Path) -> RoundUpdate:
        return _ScaffoldUpdate(self, len(sites), scratch)

    def saved_arrays(self) -> dict[str, Weights]:
        return {"c": self.control}

    def restore(self, arrays: dict[str, Weights]) -> None:
        self.control = dict(arrays.get("c", {}))


class _ScaffoldUpdate(RoundUpdate):
    def __init__(self, workflow: Scaffold, num_sites: int, scratch: Path) -> None:
        super().__init__(scratch)
        self._workflow = workflow
        self._num_sites = num_sites
        self._changes = WeightedAverage(scratch)

    def add(self, result: Result) -> None:
        change = result.extra.get(SCAFFOLD_DELTA_C)
        if change is None:
            raise ValueError(
                f"SCAFFOLD needs the site's control-variate change (extra {SCAFFOLD_DELTA_C!r}); its trainer or "
                "script does not send one (see fedstream.pt.algorithms.ScaffoldState)"
            )
        check_weights(change, self._workflow.control)
        super().add(result)
        self._changes.add(change, 1.0)

    def result(self) -> Weights:
        weights = super().result()
        changes = self._changes.sums()
        self._workflow.control = {
            name: (c.astype(np.float64) + changes[name] / self._num_sites).astype(c.dtype)
            for name, c in self._workflow.control.items()
        }
        return weights
