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

from fedstream.site.context import SiteContext, current_site
from fedstream.tracking.records import (
    ARTIFACT,
    METRIC,
    PARAM,
    TAG,
    TEXT,
    Analytics,
    Record,
    check_key,
    check_path,
    check_step,
    check_tag_name,
    check_text,
    check_time,
    check_timestamp_ms,
    check_value,
)


def _step(site: SiteContext, key: str, step: Any) -> int:
    """The step to use: the given one, or the next after the last one used for ``key`` on this site."""
    return site.auto_steps.get(key, 0) if step is None else check_step(step, key)


def _emit(site: SiteContext, records: list[Record]) -> None:
    """Send checked records, and only then advance the automatic steps: a call is all or nothing."""
    for record in records:
        site.emit(Analytics(record))
    for record in records:
        if record.kind in (METRIC, TEXT, ARTIFACT) and record.step >= site.auto_steps.get(record.key, 0):
            site.auto_steps[record.key] = record.step + 1


def _metrics(site: SiteContext, values: Mapping[Any, Any], step: Any, wall_time: float, prefix: str = "") -> None:
    """Check every metric of one call first, then send them all."""
    records = []
    for key, value in values.items():
        name = check_key(f"{prefix}{key}" if prefix else key, "metric name")
        records.append(Record(METRIC, name, check_value(value, name), _step(site, name, step), wall_time))
    _emit(site, records)


def _labels(kind: str, values: Mapping[Any, Any]) -> None:
    """Params or tags: checked names and values stored as text, all or nothing."""
    site = current_site()
    now = time.time()
    records = []
    for key, value in values.items():
        name = check_tag_name(key) if kind == TAG else check_key(key, f"{kind} name")
        records.append(Record(kind, name, check_text(str(value), kind, name), 0, now))
    _emit(site, records)


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
        wall_time = time.time() if timestamp is None else check_timestamp_ms(timestamp, str(key))
        _metrics(current_site(), {key: value}, step, wall_time)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, timestamp: int | None = None) -> None:
        """Log several metrics at the same step and time; if one is invalid, none is logged."""
        site = current_site()
        wall_time = time.time() if timestamp is None else check_timestamp_ms(timestamp, "timestamp")
        _metrics(site, _mapping(metrics, "metrics"), step, wall_time)

    def log_param(self, key: str, value: Any) -> None:
        """Log a parameter (stored as text, at most 6,000 characters; the first value of a key is kept, a
        different later value is reported)."""
        _labels(PARAM, {key: value})

    def log_params(self, params: dict[str, Any]) -> None:
        """Log several parameters; if one is invalid, none is logged."""
        _labels(PARAM, _mapping(params, "params"))

    def set_tag(self, key: str, value: Any) -> None:
        """Set a tag on the site's run (stored as text, at most 8,000 characters; the last value wins)."""
        _labels(TAG, {key: value})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set several tags; if one is invalid, none is set."""
        _labels(TAG, _mapping(tags, "tags"))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` (at most 1,000,000 characters) as the file ``artifact_file`` (a relative path) of the
        site's run."""
        site = current_site()
        path = check_path(artifact_file)
        if not isinstance(text, str):
            raise TypeError(f"log_text: text must be a str, got {type(text).__name__}")
        _emit(site, [Record(ARTIFACT, path, check_text(text, ARTIFACT, path), _step(site, path, None), time.time())])


mlflow = MLflowWriter()
"""MLflow's fluent calls for a script: ``import mlflow`` becomes ``from fedstream import mlflow`` and every
``mlflow.log_metric(...)``, ``mlflow.log_params(...)``, ``mlflow.set_tag(...)``, ``mlflow.log_text(...)`` call
stays as it is."""


class SummaryWriter:
    """TensorBoard-style tracking calls (``torch.utils.tensorboard.SummaryWriter``), streamed to the server.

    ``add_scalars(main, {k: v})`` becomes one series per key, named ``main/k``.
    """

    def add_scalar(
        self, tag: str, scalar_value: float, global_step: int | None = None, walltime: float | None = None
    ) -> None:
        _metrics(current_site(), {tag: scalar_value}, global_step, _now(walltime, str(tag)))

    def add_scalars(
        self,
        main_tag: str,
        tag_scalar_dict: dict[str, float],
        global_step: int | None = None,
        walltime: float | None = None,
    ) -> None:
        site = current_site()
        main = check_key(main_tag, "main tag")
        _metrics(site, _mapping(tag_scalar_dict, "tag_scalar_dict"), global_step, _now(walltime, main), f"{main}/")

    def add_text(
        self, tag: str, text_string: str, global_step: int | None = None, walltime: float | None = None
    ) -> None:
        site = current_site()
        tag = check_key(tag, "text tag")
        if not isinstance(text_string, str):
            raise TypeError(f"add_text: text must be a str, got {type(text_string).__name__}")
        text = check_text(text_string, TEXT, tag)
        _emit(site, [Record(TEXT, tag, text, _step(site, tag, global_step), _now(walltime, tag))])

    def add_hparams(
        self,
        hparam_dict: dict[str, Any],
        metric_dict: dict[str, float],
        global_step: int | None = None,
    ) -> None:
        """Hyper-parameters become params, their metrics become metrics."""
        site = current_site()
        now = time.time()
        params = [
            Record(PARAM, name, check_text(str(value), PARAM, name), 0, now)
            for name, value in (
                (check_key(k, "param name"), v) for k, v in _mapping(hparam_dict, "hparam_dict").items()
            )
        ]
        metrics = [
            Record(METRIC, name, check_value(value, name), _step(site, name, global_step), now)
            for name, value in (
                (check_key(k, "metric name"), v) for k, v in _mapping(metric_dict, "metric_dict").items()
            )
        ]
        _emit(site, params + metrics)

    def flush(self) -> None:
        """Nothing to do: events are shipped continuously, and all of them before a task's result."""

    def close(self) -> None:
        """Nothing to do (see :meth:`flush`)."""


class WandBWriter:
    """Weights & Biases-style ``log(dict, step)``: every entry is a metric."""

    def log(self, data: dict[str, float], step: int | None = None) -> None:
        _metrics(current_site(), _mapping(data, "data"), step, time.time())
