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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedstream.errors import ConfigError, JobFailed
from fedstream.messages import TRAIN, VALIDATE, Failure, Payload, Result, Weights
from fedstream.server.dispatch import Reply
from fedstream.server.federation import Federation
from fedstream.server.models import ModelStore
from fedstream.workflows.aggregate import MetricAverage, WeightedAverage, check_weights
from fedstream.workflows.base import RoundCompleted, RoundStarted, RoundSummary, Workflow
from fedstream.workflows.cross_site import evaluate_across_sites, saved_models

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
        reject_non_finite: leave out a site whose trained weights hold NaN or infinite values.
        max_samples: the largest sample count a site may report (a larger one would swamp the average).
        cross_site_eval: after training, have every site validate the global model and every site's last
            local model (kept in ``models/local/``); see :mod:`fedstream.workflows.cross_site`.
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
        reject_non_finite: bool = True,
        max_samples: int = 10**9,
        cross_site_eval: bool = False,
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
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"must be a finite number of seconds, 0 or more, got {value}", key=name)
        if max_samples < 1:
            raise ConfigError(f"must be at least 1, got {max_samples}", key="max_samples")
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
        self.reject_non_finite = reject_non_finite
        self.max_samples = max_samples
        self.cross_site_eval = cross_site_eval

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

    def run(self, federation: Federation, models: ModelStore, weights: Weights) -> None:
        best: float | None = None
        first = 1
        resumed = models.resume()
        if resumed is not None:
            done, state, weights, arrays = resumed
            del resumed  # the resumed model is freed after the first round, like any earlier one
            first, best = done + 1, state.get("best")
            self.restore(arrays)
            log.info("resuming the job after round %d of %d", done, self.num_rounds)
        model = GlobalModel(weights)
        del weights  # held by ``model`` alone, which a round empties before it makes the next model
        for round in range(first, self.num_rounds + 1):
            summary = self._round(federation, models, round, model)
            self._check_metrics(summary)
            score = summary.metrics[self.key_metric]
            if best is None or (score > best if self.key_metric_mode == "max" else score < best):
                best = score
                models.keep("best", "global")  # the round's model, saved as global
            federation.bus.fire(RoundCompleted(summary))
            models.checkpoint(round, {"best": best}, self.saved_arrays())
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
        if self.cross_site_eval:
            evaluate_across_sites(
                federation,
                saved_models(models, federation.sites),
                key_metric=self.key_metric,
                round=models.last_round(),
                timeout_s=self.task_timeout_s,
            )

    def _round(self, federation: Federation, models: ModelStore, round: int, model: GlobalModel) -> RoundSummary:
        """Train, average, save and validate once: ``model`` holds the new global weights after it."""
        started = time.monotonic()
        sampled = self.sample(federation.sites, round)
        federation.bus.fire(RoundStarted(round, self.num_rounds))
        log.info("round %d/%d: training on %d site(s)", round, self.num_rounds, len(sampled))

        weights = model.weights
        update = self.round_update(weights, federation.sites, models.folder)

        def add_trained(result: Result) -> None:
            self._check_samples(result)
            check_weights(result.weights, weights, finite=self.reject_non_finite)
            update.add(result)
            if self.cross_site_eval:
                models.save(f"local/{result.site}", result.weights)

        trained = self._collect(federation, TRAIN, round, sampled, self.train_payload(weights), add_trained)
        del weights  # also from add_trained, which shares the name
        model.weights = {}  # the round's model goes (an update that needs it kept it) before the next is made
        weights = model.weights = update.result()
        models.save("global", weights)

        validators = federation.sites if self.validate_on == "all" else sampled
        metrics = MetricAverage()

        def add_validated(result: Result) -> None:
            self._check_samples(result)
            metrics.add(result.metrics, result.num_samples)

        validated = self._collect(federation, VALIDATE, round, validators, Payload(weights), add_validated)
        summary = RoundSummary(
            round=round,
            duration_s=time.monotonic() - started,
            clients=trained.sites,
            num_samples=int(update.average.total_weight),
            metrics=metrics.result(),
            validated=validated.sites,
            failed=trained.failed + validated.failed,
            ended_at=time.time(),
        )
        return summary

    # -- what the algorithms built on FedAvg change ---------------------------------------------------------------
    def train_payload(self, weights: Weights) -> Payload:
        """What a train task carries: the global model (and, in subclasses, settings and extra arrays)."""
        return Payload(weights)

    def round_update(self, weights: Weights, sites: Sequence[str], scratch: Path) -> RoundUpdate:
        """How this round's training results (from some of ``sites``) become the next global model (an update
        that needs ``weights`` to make it keeps them); ``scratch`` is a folder for its temporary files."""
        return RoundUpdate(scratch)

    def saved_arrays(self) -> dict[str, Weights]:
        """The algorithm's state to keep in each round's checkpoint (FedAvg has none)."""
        return {}

    def restore(self, arrays: dict[str, Weights]) -> None:
        """Take back the state of :meth:`saved_arrays` when a job resumes from a checkpoint."""

    def _check_samples(self, result: Result) -> None:
        if not 1 <= result.num_samples <= self.max_samples:
            raise ValueError(
                f"num_samples must be from 1 to {self.max_samples} (max_samples), got {result.num_samples}"
            )

    def _check_metrics(self, summary: RoundSummary) -> None:
        """The key metric and the stop condition's metric must be among the validation metrics."""
        names = ", ".join(sorted(summary.metrics)) or "none"
        if self.key_metric not in summary.metrics:
            raise JobFailed(
                f"round {summary.round}: key_metric {self.key_metric!r} is not among the validation metrics "
                f"({names}); set server.workflow.args.key_metric"
            )
        if self.stop is not None and self.stop[0] not in summary.metrics:
            raise JobFailed(
                f"round {summary.round}: stop_condition names {self.stop[0]!r}, which is not among the validation "
                f"metrics ({names}); fix server.workflow.args.stop_condition"
            )

    def _should_stop(self, metrics: dict[str, float]) -> bool:
        assert self.stop is not None
        key, op, threshold = self.stop
        return _COMPARE[op](metrics[key], threshold)

    def _collect(
        self,
        federation: Federation,
        kind: str,
        round: int,
        sites: Sequence[str],
        payload: Payload,
        accept: Callable[[Result], None],
    ) -> RoundReplies:
        """Send ``kind`` tasks to ``sites`` and pass each good result to ``accept`` until enough have answered."""
        needed = min(self.min_clients, len(sites))
        dispatch = federation.dispatch(kind, round, self.num_rounds, dict.fromkeys(sites, payload), self.task_timeout_s)
        replies = RoundReplies()
        longest = 0.0
        while (reply := dispatch.next_reply()) is not None:
            if replies.take(reply, accept):
                longest = max(longest, reply.duration_s)
                if len(replies.sites) == needed:
                    dispatch.give_up_late(longest, self.wait_after_min_clients_s)
            else:
                log.warning("round %d: %s at %s failed: %s", round, kind, reply.site, replies.failed[-1].reason)
            if len(replies.sites) + len(dispatch.pending) < needed:
                break
        stopped = len(dispatch.pending)
        dispatch.cancel()
        replies.sites.sort(key=sites.index)
        if len(replies.sites) < needed:
            unfinished = f"; {stopped} site(s) still running were stopped" if stopped else ""
            raise JobFailed(
                f"round {round}: {kind}: only {len(replies.sites)} of {len(sites)} sites answered and min_clients is "
                f"{self.min_clients} ({summarize(replies.failed) or 'no answer'}{unfinished})"
            )
        return replies


@dataclass
class GlobalModel:
    """The global model's weights, held in one place: a round empties it before it makes the next model, so
    that the server does not hold both (a model's worth of memory less at the round's peak)."""

    weights: Weights


class RoundUpdate:
    """FedAvg's round: the next global model is the average of the trained weights, weighted by samples,
    accumulated as results arrive."""

    def __init__(self, scratch: Path) -> None:
        self.average = WeightedAverage(scratch)

    def add(self, result: Result) -> None:
        """Take one site's checked training result."""
        self.average.add(result.weights, result.num_samples)

    def result(self) -> Weights:
        """The next global model."""
        return self.average.result()


class RoundReplies:
    """The sites that answered a task well, and the failures of the others."""

    def __init__(self) -> None:
        self.sites: list[str] = []
        self.failed: list[Failure] = []

    def take(self, reply: Reply, accept: Callable[[Result], None]) -> bool:
        """Record ``reply``; a good result goes to ``accept``. Returns whether it was good."""
        if reply.result is not None and reply.failure is None:
            try:
                accept(reply.result)
            except ValueError as exc:
                self.failed.append(Failure(reply.site, reply.kind, f"unusable result: {exc}"))
                return False
            self.sites.append(reply.site)
            return True
        assert reply.failure is not None
        self.failed.append(reply.failure)
        return False


def summarize(failures: Sequence[Failure], limit: int = 5) -> str:
    """``site: reason; ...`` for the first ``limit`` failures, then how many more (and of how many causes)."""
    shown = "; ".join(f"{failure.site}: {failure.reason}" for failure in failures[:limit])
    rest = failures[limit:]
    if rest:
        causes = len({failure.reason for failure in rest})
        shown += f"; and {len(rest)} more site(s) ({causes} other cause(s); see result.json)"
    return shown
