"""Tracking calls in the styles people already use, for code that runs on a site.

``MLflowWriter`` (``log_metric``, ``log_params``, ``log_text``, ``set_tag``, ...), ``SummaryWriter``
(TensorBoard's ``add_scalar``, ``add_scalars``, ``add_text``, ``add_hparams``) and ``WandBWriter`` (``log``)
need no setup and neither mlflow nor tensorboard: each call checks its input (a clear error at the call site),
stamps the site's clock and fires an ``analytics`` event on the current site's bus, which ships it to the
server. Nothing waits on the network. A writer may be created anywhere (even at module level): every call
goes to the site whose task is running.

Steps: a given step is kept as it is. Without one, a metric gets the step after the last one this site
used for the same key (0 for the first), so a series never collapses onto one step. For training metrics
prefer ``task.global_step(local_step, steps_per_round)``, which keeps successive rounds apart.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from fedstream.events import ANALYTICS, Event
from fedstream.site.context import SiteContext, current_site
from fedstream.tracking.records import (
    ARTIFACT,
    METRIC,
    PARAM,
    TAG,
    TEXT,
    Record,
    check_key,
    check_path,
    check_step,
    check_time,
    check_timestamp_ms,
    check_value,
)


def _step(site: SiteContext, key: str, step: Any) -> int:
    """The step to use: the given one, or the next after the last one used for ``key`` on this site."""
    steps = site.auto_steps
    chosen = steps.get(key, 0) if step is None else check_step(step, key)
    if chosen >= steps.get(key, 0):
        steps[key] = chosen + 1
    return chosen


def _emit(site: SiteContext, record: Record) -> None:
    site.bus.fire(Event(ANALYTICS, record))


def _metric(site: SiteContext, key: Any, value: Any, step: Any, wall_time: float) -> None:
    key = check_key(key, "metric name")
    number = check_value(value, key)
    _emit(site, Record(METRIC, key, number, _step(site, key, step), wall_time))


def _label(kind: str, key: Any, value: Any) -> None:
    """A param or a tag: a checked name and a value stored as text."""
    site = current_site()
    _emit(site, Record(kind, check_key(key, f"{kind} name"), str(value), 0, time.time()))


def _now(wall_time: Any, key: str) -> float:
    return time.time() if wall_time is None else check_time(wall_time, key)


def _mapping(value: Any, what: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, got {type(value).__name__}")
    return value


class MLflowWriter:
    """MLflow-style tracking calls; the server writes them to its MLflow backend (and TensorBoard)."""

    def log_metric(self, key: str, value: float, step: int | None = None, timestamp: int | None = None) -> None:
        """Log one metric value; ``timestamp`` is in milliseconds since the epoch (default: now)."""
        wall_time = time.time() if timestamp is None else check_timestamp_ms(timestamp, key)
        _metric(current_site(), key, value, step, wall_time)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, timestamp: int | None = None) -> None:
        """Log several metrics at the same step and time."""
        site = current_site()
        wall_time = time.time() if timestamp is None else check_timestamp_ms(timestamp, "timestamp")
        for key, value in _mapping(metrics, "metrics").items():
            _metric(site, key, value, step, wall_time)

    def log_param(self, key: str, value: Any) -> None:
        """Log a parameter (stored as text; logged once per run, a different later value is reported)."""
        _label(PARAM, key, value)

    def log_params(self, params: dict[str, Any]) -> None:
        for key, value in _mapping(params, "params").items():
            self.log_param(key, value)

    def set_tag(self, key: str, value: Any) -> None:
        """Set a tag on the site's run (the last value wins)."""
        _label(TAG, key, value)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in _mapping(tags, "tags").items():
            self.set_tag(key, value)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the file ``artifact_file`` (a relative path) of the site's run."""
        site = current_site()
        if not isinstance(text, str):
            raise TypeError(f"log_text: text must be a str, got {type(text).__name__}")
        path = check_path(artifact_file)
        _emit(site, Record(ARTIFACT, path, text, _step(site, path, None), time.time()))


class SummaryWriter:
    """TensorBoard-style tracking calls (``torch.utils.tensorboard.SummaryWriter``), streamed to the server.

    ``add_scalars(main, {k: v})`` becomes one series per key, named ``main/k``.
    """

    def add_scalar(
        self, tag: str, scalar_value: float, global_step: int | None = None, walltime: float | None = None
    ) -> None:
        _metric(current_site(), tag, scalar_value, global_step, _now(walltime, tag))

    def add_scalars(
        self,
        main_tag: str,
        tag_scalar_dict: dict[str, float],
        global_step: int | None = None,
        walltime: float | None = None,
    ) -> None:
        site = current_site()
        wall_time = _now(walltime, main_tag)
        for key, value in _mapping(tag_scalar_dict, "tag_scalar_dict").items():
            _metric(site, f"{main_tag}/{key}", value, global_step, wall_time)

    def add_text(
        self, tag: str, text_string: str, global_step: int | None = None, walltime: float | None = None
    ) -> None:
        site = current_site()
        tag = check_key(tag, "text tag")
        if not isinstance(text_string, str):
            raise TypeError(f"add_text: text must be a str, got {type(text_string).__name__}")
        _emit(site, Record(TEXT, tag, text_string, _step(site, tag, global_step), _now(walltime, tag)))

    def add_hparams(
        self,
        hparam_dict: dict[str, Any],
        metric_dict: dict[str, float],
        global_step: int | None = None,
    ) -> None:
        """Hyper-parameters become params, their metrics become metrics."""
        writer = MLflowWriter()
        writer.log_params(hparam_dict)
        site = current_site()
        wall_time = time.time()
        for key, value in _mapping(metric_dict, "metric_dict").items():
            _metric(site, key, value, global_step, wall_time)

    def flush(self) -> None:
        """Nothing to do: events are shipped continuously, and all of them before a task's result."""

    def close(self) -> None:
        """Nothing to do (see :meth:`flush`)."""


class WandBWriter:
    """Weights & Biases-style ``log(dict, step)``: every entry is a metric."""

    def log(self, data: dict[str, float], step: int | None = None) -> None:
        site = current_site()
        wall_time = time.time()
        for key, value in _mapping(data, "data").items():
            _metric(site, key, value, step, wall_time)
