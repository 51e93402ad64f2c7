"""Cross-site evaluation: every site validates every model (the global one and each site's last local model) on
its own validation data, which shows which model works where.

FedAvg runs it after training with ``cross_site_eval = true`` (it then keeps each site's last trained model
in ``models/local/<site>.pt``); :class:`CrossSiteEval` runs it on its own, from saved models. The matrix is
fired as a :class:`CrossSiteEvaluated` event: ``result.json``, the MLflow receiver (metrics on the parent
run, a CSV and a heat map) and the summary table take it from there. A site that fails to validate a model
leaves a hole in the matrix and a failure, never a failed job.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fedstream.errors import ConfigError, JobFailed
from fedstream.messages import VALIDATE, Failure, Payload, Weights
from fedstream.server.federation import Federation
from fedstream.server.models import ModelStore, load_weights
from fedstream.workflows.aggregate import check_weights
from fedstream.workflows.base import Workflow

log = logging.getLogger(__name__)

GLOBAL = "global"


@dataclass(frozen=True)
class CrossSiteMatrix:
    """Which model scored what on which site.

    Attributes:
        key_metric: the metric the summary and the heat map show.
        models: the models, in order (``global`` first, then the sites' local models by site name).
        sites: the sites that validated, in the job's order.
        metrics: ``metrics[model][site]`` is the site's validation metrics of the model (missing: it failed).
        failed: the validations that failed.
    """

    key_metric: str
    models: list[str]
    sites: list[str]
    metrics: dict[str, dict[str, dict[str, float]]]
    failed: list[Failure] = field(default_factory=list)


@dataclass(frozen=True)
class CrossSiteEvaluated:
    """A cross-site evaluation is complete."""

    name: ClassVar[str] = "cross_site_evaluated"
    matrix: CrossSiteMatrix


def evaluate_across_sites(
    federation: Federation,
    models: dict[str, Path],
    *,
    key_metric: str,
    round: int,
    timeout_s: float,
    like: Weights | None = None,
) -> CrossSiteMatrix:
    """Send each of ``models`` (name -> saved model), one at a time, to every site to validate; fire and
    return the matrix. ``like``: the shape every model must have (checked before it is sent)."""
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    failed: list[Failure] = []
    sites = list(federation.sites)
    for name, path in models.items():
        weights = load_weights(path)
        if like is not None:
            check_weights(weights, like, finite=False)
        log.info("cross-site evaluation: %s on %d site(s)", name, len(sites))
        payloads = dict.fromkeys(sites, Payload(weights))
        dispatch = federation.dispatch(VALIDATE, round, round, payloads, timeout_s)
        scores: dict[str, dict[str, float]] = {}
        while (reply := dispatch.next_reply()) is not None:
            if reply.result is not None and reply.failure is None:
                scores[reply.site] = dict(reply.result.metrics)
            else:
                assert reply.failure is not None
                failure = reply.failure
                failed.append(Failure(failure.site, f"cross-site validation of {name}", failure.reason))
        metrics[name] = {site: scores[site] for site in sites if site in scores}
    matrix = CrossSiteMatrix(key_metric, list(models), sites, metrics, failed)
    federation.bus.fire(CrossSiteEvaluated(matrix))
    return matrix


def saved_models(store: ModelStore, sites: Sequence[str]) -> dict[str, Path]:
    """The models a cross-site evaluation after training compares: the global one and each site's last."""
    found = {GLOBAL: store.paths[GLOBAL]}
    found.update({site: store.paths[f"local/{site}"] for site in sites if f"local/{site}" in store.paths})
    return found


class CrossSiteEval(Workflow):
    """A cross-site evaluation on its own: every site validates each of ``models``.

    Args:
        models: the models to compare, by name: paths of saved models (``global.pt`` of an earlier job, say).
        key_metric: the metric the summary and the heat map show.
        task_timeout_s: a site that has not answered within this many seconds is left out; 0 waits forever.
    """

    def __init__(self, *, models: dict[str, str], key_metric: str = "accuracy", task_timeout_s: float = 0.0) -> None:
        if not models:
            raise ConfigError('name at least one model: models = { global = "/path/to/global.pt" }', key="models")
        for name, path in models.items():
            if not (0 < len(name) <= 64 and all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in name)):
                raise ConfigError(
                    f"a model's name is 1-64 letters, digits, '-', '_' or '.' (it names metrics), got {name!r}",
                    key=f"models.{name}",
                )
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"no model file {path}", key=f"models.{name}")
        if not (math.isfinite(task_timeout_s) and task_timeout_s >= 0):
            raise ConfigError(
                f"must be a finite number of seconds, 0 or more, got {task_timeout_s}", key="task_timeout_s"
            )
        self.models = {name: Path(path).expanduser() for name, path in models.items()}
        self.key_metric = key_metric
        self.task_timeout_s = task_timeout_s

    def run(self, federation: Federation, models: ModelStore, weights: Weights) -> None:
        matrix = evaluate_across_sites(
            federation, self.models, key_metric=self.key_metric, round=1, timeout_s=self.task_timeout_s, like=weights
        )
        if not any(matrix.metrics.values()):
            raise JobFailed(f"no site validated any model ({'; '.join(str(f) for f in matrix.failed[:5])})")
