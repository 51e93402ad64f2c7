"""Federated averaging (McMahan et al., 2017): train on sampled sites, average weighted by samples, validate.

Each round:

1. sample the round's sites (seeded), send them the global model to ``train``;
2. average the returned weights, weighted by each site's number of training samples, as they arrive;
3. save the new global model, send it to the sites to ``validate``, average their metrics weighted by
   validation samples; save it as the best model if the key metric improved;
4. stop early if ``stop_condition`` holds.

A site that fails or times out is left out of the round as long as ``min_clients`` sites answered;
otherwise the job fails, naming every site and its cause.
"""

from __future__ import annotations

import logging
import math
import operator
import re
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from fedstream.errors import ConfigError, JobFailed
from fedstream.events import ROUND_COMPLETED, ROUND_STARTED, Event
from fedstream.messages import TRAIN, VALIDATE, Result, Weights
from fedstream.server.federation import Federation, Reply
from fedstream.workflows.aggregate import MetricAverage, WeightedAverage
from fedstream.workflows.base import RoundStarted, RoundSummary, Workflow

log = logging.getLogger(__name__)

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
_CONDITION = re.compile(r"^\s*([\w./\- :]+?)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class FedAvg(Workflow):
    """Federated averaging.

    Args:
        num_rounds: rounds to run.
        min_clients: sites that must answer in every round (and that must exist).
        clients_per_round: sites sampled per round: an integer count, or a float fraction in (0, 1].
        seed: seed of the per-round sampling.
        task_timeout_s: a site that has not answered a task within this many seconds is left out; 0 waits forever.
        wait_after_min_clients_s: once ``min_clients`` sites answered, a site still running this much longer than
            they took (from its own start: a site waiting for its turn is not late) is left out of the round.
        validate_on: which sites validate each new global model: ``all`` sites or the round's ``sampled`` ones.
        key_metric: the validation metric that picks the best model.
        key_metric_mode: whether a ``max`` or a ``min`` of the key metric is best.
        stop_condition: stop early when it holds, e.g. ``"accuracy >= 0.6"``; empty never stops early.
    """

    def __init__(
        self,
        *,
        num_rounds: int = 3,
        min_clients: int = 2,
        clients_per_round: int | float = 1.0,
        seed: int = 0,
        task_timeout_s: float = 0.0,
        wait_after_min_clients_s: float = 10.0,
        validate_on: Literal["all", "sampled"] = "all",
        key_metric: str = "accuracy",
        key_metric_mode: Literal["max", "min"] = "max",
        stop_condition: str = "",
    ) -> None:
        if num_rounds < 1:
            raise ConfigError(f"must be at least 1, got {num_rounds}", key="num_rounds")
        if min_clients < 1:
            raise ConfigError(f"must be at least 1, got {min_clients}", key="min_clients")
        if isinstance(clients_per_round, float) and not 0 < clients_per_round <= 1:
            raise ConfigError(f"a fraction must be in (0, 1], got {clients_per_round}", key="clients_per_round")
        if isinstance(clients_per_round, int) and clients_per_round < min_clients:
            raise ConfigError(
                f"{clients_per_round} sites per round cannot satisfy min_clients = {min_clients}",
                key="clients_per_round",
            )
        for name, value in (
            ("task_timeout_s", task_timeout_s),
            ("wait_after_min_clients_s", wait_after_min_clients_s),
        ):
            if value < 0:
                raise ConfigError(f"must be 0 or more, got {value}", key=name)
        self.stop = None
        if stop_condition:
            match = _CONDITION.match(stop_condition)
            if not match:
                raise ConfigError(
                    f"expected '<metric> <op> <number>' with op one of >=, >, <=, <; got {stop_condition!r}",
                    key="stop_condition",
                )
            self.stop = (match[1], match[2], float(match[3]))
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.task_timeout_s = task_timeout_s
        self.wait_after_min_clients_s = wait_after_min_clients_s
        self.validate_on = validate_on
        self.key_metric = key_metric
        self.key_metric_mode = key_metric_mode

    def check(self, sites: Sequence[str]) -> None:
        if self.min_clients > len(sites):
            raise ConfigError(
                f"{self.min_clients} sites must answer each round but the job has {len(sites)}",
                key="min_clients",
            )
        per_round = self._per_round(len(sites))
        if per_round < self.min_clients:
            raise ConfigError(
                f"{self.clients_per_round} of {len(sites)} sites is {per_round} per round, fewer than "
                f"min_clients = {self.min_clients}",
                key="clients_per_round",
            )

    def _per_round(self, num_sites: int) -> int:
        if isinstance(self.clients_per_round, float):
            return max(1, math.ceil(self.clients_per_round * num_sites - 1e-9))
        return min(self.clients_per_round, num_sites)

    def sample(self, sites: Sequence[str], round: int) -> list[str]:
        """The sites that train in ``round``: a seeded sample, in the job's site order."""
        count = self._per_round(len(sites))
        if count >= len(sites):
            return list(sites)
        chosen = np.random.default_rng([self.seed, round]).choice(len(sites), size=count, replace=False)
        return [sites[i] for i in sorted(chosen)]

    def run(self, federation: Federation, weights: Weights) -> None:
        best: float | None = None
        for round in range(1, self.num_rounds + 1):
            weights, summary = self._round(federation, round, weights)
            score = summary.metrics[self.key_metric]
            if best is None or (score > best if self.key_metric_mode == "max" else score < best):
                best = score
                federation.models.save("best", weights)
            federation.bus.fire(Event(ROUND_COMPLETED, summary))
            log.info(
                "round %d/%d done in %.1f s: %s",
                round,
                self.num_rounds,
                summary.duration_s,
                ", ".join(f"{key}={value:.4g}" for key, value in summary.metrics.items()),
            )
            if self.stop is not None and self._should_stop(summary.metrics):
                log.info("round %d: stop condition %s %s %g holds; stopping early", round, *self.stop)
                break

    def _round(self, federation: Federation, round: int, weights: Weights) -> tuple[Weights, RoundSummary]:
        """Train, average, save and validate once; returns the new global weights and the round's summary."""
        started = time.monotonic()
        sampled = self.sample(federation.sites, round)
        federation.bus.fire(Event(ROUND_STARTED, RoundStarted(round, self.num_rounds)))
        log.info("round %d/%d: training on %d site(s)", round, self.num_rounds, len(sampled))

        average = WeightedAverage()
        trained = self._collect(
            federation, TRAIN, round, sampled, weights, lambda r: average.add(r.weights, r.num_samples)
        )
        weights = average.result()
        federation.models.save("global", weights)

        validators = federation.sites if self.validate_on == "all" else sampled
        metrics = MetricAverage()
        validated = self._collect(
            federation, VALIDATE, round, validators, weights, lambda r: metrics.add(r.metrics, r.num_samples)
        )
        global_metrics = metrics.result()
        if self.key_metric not in global_metrics:
            raise JobFailed(
                f"round {round}: key_metric {self.key_metric!r} is not among the validation metrics "
                f"({', '.join(sorted(global_metrics)) or 'none'}); set server.workflow.args.key_metric"
            )
        summary = RoundSummary(
            round=round,
            duration_s=time.monotonic() - started,
            clients=trained.sites,
            num_samples=int(average.total_weight),
            metrics=global_metrics,
            failed={**validated.failed, **trained.failed},
        )
        return weights, summary

    def _should_stop(self, metrics: dict[str, float]) -> bool:
        assert self.stop is not None
        key, op, threshold = self.stop
        return key in metrics and _COMPARE[op](metrics[key], threshold)

    def _collect(
        self,
        federation: Federation,
        task: str,
        round: int,
        sites: Sequence[str],
        weights: Weights,
        accept: Callable[[Result], None],
    ) -> RoundReplies:
        """Send ``task`` to ``sites`` and pass each good result to ``accept`` until enough have answered."""
        needed = min(self.min_clients, len(sites))
        dispatch = federation.dispatch(task, round, self.num_rounds, weights, sites, self.task_timeout_s)
        replies = RoundReplies()
        longest = 0.0
        while (reply := dispatch.next_reply()) is not None:
            if replies.take(reply, accept):
                longest = max(longest, reply.duration_s)
                if len(replies.sites) == needed:
                    dispatch.give_up_late(longest, self.wait_after_min_clients_s)
            else:
                log.warning("round %d: %s at %s failed: %s", round, task, reply.site, reply.error)
            if len(replies.sites) + len(dispatch.pending) < needed:
                break
        dispatch.cancel()
        replies.sites.sort(key=sites.index)
        if len(replies.sites) < needed:
            causes = "; ".join(f"{site}: {why}" for site, why in replies.failed.items()) or "no answer"
            raise JobFailed(
                f"round {round}: {task}: only {len(replies.sites)} of {len(sites)} sites answered and min_clients is "
                f"{self.min_clients} ({causes})"
            )
        return replies


class RoundReplies:
    """The sites that answered a task well, and why the others did not."""

    def __init__(self) -> None:
        self.sites: list[str] = []
        self.failed: dict[str, str] = {}

    def take(self, reply: Reply, accept: Callable[[Result], None]) -> bool:
        """Record ``reply``; a good result goes to ``accept``. Returns whether it was good."""
        if reply.result is not None and reply.ok:
            try:
                accept(reply.result)
            except ValueError as exc:
                self.failed[reply.site] = f"unusable result: {exc}"
                return False
            self.sites.append(reply.site)
            return True
        self.failed[reply.site] = reply.error
        return False
