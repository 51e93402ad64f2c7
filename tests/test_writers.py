"""Client-side writers: input checked at the call site, steps and times as documented."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedstream.errors import FedstreamError
from fedstream.events import EventBus
from fedstream.site.context import SiteContext, restore, run_as
from fedstream.tracking import MLflowWriter, SummaryWriter, WandBWriter
from fedstream.tracking.records import ARTIFACT, METRIC, PARAM, TAG, TEXT, Analytics, Record, from_wire


@pytest.fixture
def records(tmp_path: Path) -> Iterator[list[Record]]:
    """Run as a site whose analytics events are collected."""
    bus = EventBus()
    seen: list[Record] = []
    bus.subscribe(Analytics, lambda event: seen.append(event.record))
    site = SiteContext("site-1", 0, 1, "job", "id", tmp_path, bus, logging.getLogger("test"))
    token = run_as(site)
    yield seen
    restore(token)


def test_mlflow_calls_become_records(records: list[Record]) -> None:
    writer = MLflowWriter()
    before = time.time()
    writer.log_metric("loss", 0.5, step=3)
    writer.log_metric("loss", 0.25, step=4, timestamp=1_700_000_000_123)
    writer.log_metrics({"a": 1, "b": np.float32(2.5)}, step=7)
    writer.log_param("lr", 0.1)
    writer.log_params({"opt": "sgd"})
    writer.set_tag("where", "site-1")
    writer.set_tags({"round": 1})
    writer.log_text("hello", "notes/a.txt")
    kinds = [(r.kind, r.key, r.value, r.step) for r in records]
    assert kinds == [
        (METRIC, "loss", 0.5, 3), (METRIC, "loss", 0.25, 4), (METRIC, "a", 1.0, 7), (METRIC, "b", 2.5, 7),
        (PARAM, "lr", "0.1", 0), (PARAM, "opt", "sgd", 0), (TAG, "where", "site-1", 0), (TAG, "round", "1", 0),
        (ARTIFACT, "notes/a.txt", "hello", 0),
    ]  # fmt: skip
    assert before <= records[0].time <= time.time()
    assert records[1].time == 1_700_000_000.123, "the site's timestamp is kept (ms -> s)"
    assert all(from_wire(r.to_wire()) == r for r in records), "records survive the trip to the server"


def test_tensorboard_and_wandb_calls(records: list[Record]) -> None:
    tb = SummaryWriter()
    tb.add_scalar("acc", torch.tensor(0.75), global_step=2, walltime=1_700_000_000.5)
    tb.add_scalars("loss", {"train": 1.0, "val": 2.0}, global_step=5)
    tb.add_text("note", "hi", global_step=3)
    tb.add_hparams({"lr": 0.01}, {"hp_metric": 0.9})
    tb.flush()
    tb.close()
    WandBWriter().log({"w": 1.5}, step=9)
    got = [(r.kind, r.key, r.value, r.step) for r in records]
    assert got == [
        (METRIC, "acc", 0.75, 2), (METRIC, "loss/train", 1.0, 5), (METRIC, "loss/val", 2.0, 5),
        (TEXT, "note", "hi", 3), (PARAM, "lr", "0.01", 0), (METRIC, "hp_metric", 0.9, 0), (METRIC, "w", 1.5, 9),
    ]  # fmt: skip
    assert records[0].time == 1_700_000_000.5


def test_missing_steps_continue_each_series(records: list[Record]) -> None:
    writer = MLflowWriter()
    writer.log_metric("x", 1.0)
    writer.log_metric("x", 2.0)
    writer.log_metric("y", 3.0)
    writer.log_metric("x", 4.0, step=10)
    writer.log_metric("x", 5.0)
    writer.log_metric("x", 6.0, step=2)  # an explicit earlier step is kept as it is
    writer.log_metric("x", 7.0)
    assert [(r.key, r.step) for r in records] == [
        ("x", 0),
        ("x", 1),
        ("y", 0),
        ("x", 10),
        ("x", 11),
        ("x", 2),
        ("x", 12),
    ]


def test_nan_and_infinity_pass_through(records: list[Record]) -> None:
    MLflowWriter().log_metric("loss", float("nan"), step=0)
    MLflowWriter().log_metric("loss", float("inf"), step=1)
    assert math.isnan(records[0].value) and records[1].value == math.inf  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda w: w.log_metric("loss", "0.5"), TypeError, "value must be a number, got str '0.5'"),
        (lambda w: w.log_metric("loss", None), TypeError, "value must be a number"),
        (lambda w: w.log_metric("loss", [1.0]), TypeError, "value must be a number, got list"),
        (lambda w: w.log_metric("loss", torch.ones(3)), TypeError, "value must be a number, got Tensor"),
        (lambda w: w.log_metric("acc@top1", 1.0), ValueError, "characters MLflow does not accept ('@')"),
        (lambda w: w.log_metric("a" * 251, 1.0), ValueError, "must have 1 to 250 characters, it has 251"),
        (lambda w: w.log_metric("", 1.0), ValueError, "must have 1 to 250 characters"),
        (lambda w: w.log_metric("a//b", 1.0), ValueError, "'//'"),
        (lambda w: w.log_metric("../x", 1.0), ValueError, "'..' segments"),
        (lambda w: w.log_metric(3, 1.0), TypeError, "metric name must be a str"),
        (lambda w: w.log_metric("loss", 1.0, step=-1), ValueError, "step must be >= 0, got -1"),
        (lambda w: w.log_metric("loss", 1.0, step=1.5), TypeError, "step must be an int, got float"),
        (lambda w: w.log_metric("loss", 1.0, step=True), TypeError, "step must be an int, got bool"),
        (lambda w: w.log_metric("loss", 1.0, timestamp=float("nan")), ValueError, "finite"),
        (lambda w: w.log_param("bad key!", 1), ValueError, "param name 'bad key!'"),
        (lambda w: w.set_tag("t" * 300, "x"), ValueError, "tag name"),
        (lambda w: w.log_metrics([("a", 1.0)]), TypeError, "metrics must be a dict"),
        (lambda w: w.log_text("x", "../outside.txt"), ValueError, "must not hold '..'"),
        (lambda w: w.log_text("x", "notes/../../x.txt"), ValueError, "must not hold '..'"),
        (lambda w: w.log_text("x", "/etc/passwd"), ValueError, "must be a relative POSIX path"),
        (lambda w: w.log_text("x", "C:/x.txt"), ValueError, "relative POSIX path"),
        (lambda w: w.log_text("x", "a\\b.txt"), ValueError, "relative POSIX path"),
        (lambda w: w.log_text(b"bytes", "a.txt"), TypeError, "text must be a str"),
        (lambda w: w.log_metric("loss", 1.0, timestamp=1e20), ValueError, "the year 9999"),
        (lambda w: w.log_metric("loss", 1.0, timestamp=-1), ValueError, "milliseconds since the epoch"),
        (lambda w: w.log_metrics({"a": 1.0}, timestamp=2**70), ValueError, "the year 9999"),
        (lambda w: w.log_metric("loss", 1.0, timestamp="now"), TypeError, "milliseconds since the epoch"),
        (lambda w: w.log_metric("loss", 1.0, step=2**63), ValueError, "step must be"),
        (lambda w: w.log_metric("loss", 10**400), ValueError, "too large for a float"),
        (lambda w: w.log_metric("loss", 1j), TypeError, "value must be a number, got complex"),
        (lambda w: SummaryWriter().add_scalar("x", 1.0, walltime=1e15), ValueError, "the year 9999"),
        (lambda w: SummaryWriter().add_scalar("x", 1.0, walltime=float("inf")), ValueError, "the year 9999"),
        # a call is all or nothing: one bad value and nothing of the call is sent
        (lambda w: w.log_metrics({"a": 1.0, "b": "bad"}), TypeError, "metric 'b': value must be a number"),
        (lambda w: w.log_params({"ok": 1, "bad key!": 2}), ValueError, "param name 'bad key!'"),
        (lambda w: w.set_tags({"a": 1, "b": "x" * 8001}), ValueError, "8,001 characters, more than the 8,000"),
        (lambda w: SummaryWriter().add_scalars("g", {"a": 1.0, "b": None}), TypeError, "'g/b': value must be"),
        (lambda w: SummaryWriter().add_hparams({"lr": 0.1}, {"m": "x"}), TypeError, "metric 'm'"),
        (lambda w: WandBWriter().log({"a": 1, "b": [1]}), TypeError, "metric 'b'"),
        # values every backend stores in full, or a clear refusal (MLflow would truncate them)
        (lambda w: w.log_param("p", "x" * 6001), ValueError, "6,001 characters, more than the 6,000 allowed"),
        (lambda w: w.set_tag("t", "x" * 8001), ValueError, "more than the 8,000 allowed (log long text"),
        (lambda w: w.log_text("x" * 1_000_001, "a.txt"), ValueError, "more than the 1,000,000 allowed"),
        (lambda w: SummaryWriter().add_text("t", "x" * 1_000_001), ValueError, "more than the 1,000,000"),
        (lambda w: SummaryWriter().add_scalars("a@b", {"x": 1.0}), ValueError, "main tag 'a@b'"),
        # tags fedstream and MLflow set on a site's run: a site must not rename or detach its run
        (lambda w: w.set_tag("mlflow.runName", "other"), ValueError, "tag 'mlflow.runName' is reserved"),
        (lambda w: w.set_tag("mlflow.parentRunId", "x"), ValueError, "is reserved"),
        (lambda w: w.set_tags({"ok": 1, "site": "site-2"}), ValueError, "tag 'site' is reserved"),
        (lambda w: w.set_tag("fedstream.job_id", "x"), ValueError, "is reserved"),
    ],
)
def test_bad_calls_fail_at_the_call_site(records: list[Record], call, error: type, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error) as caught:
        call(MLflowWriter())
    assert words in str(caught.value)
    assert records == [], "nothing is sent for a bad call"


def test_writers_need_a_running_site() -> None:
    with pytest.raises(FedstreamError, match="no fedstream site is running here"):
        MLflowWriter().log_metric("loss", 1.0)


def test_a_writer_follows_the_site_that_is_running(tmp_path: Path) -> None:
    writer = MLflowWriter()  # e.g. created at module level, shared by several sites in one worker
    seen: list[str] = []
    for name in ("site-1", "site-2"):
        bus = EventBus()
        bus.subscribe(Analytics, lambda event, name=name: seen.append(name))
        token = run_as(SiteContext(name, 0, 2, "job", "id", tmp_path, bus, logging.getLogger("t")))
        writer.log_metric("loss", 1.0)
        restore(token)
    assert seen == ["site-1", "site-2"]


def wire(kind: str, key: str, value: object, step: object = 0, time: object = 1.0) -> dict[str, object]:
    return {"kind": kind, "key": key, "value": value, "step": step, "time": time}


def test_server_rechecks_what_arrives() -> None:
    with pytest.raises(ValueError, match="unknown record kind"):
        from_wire(wire("image", "x", 1.0))
    with pytest.raises(ValueError, match="characters MLflow does not accept"):
        from_wire(wire("metric", "a@b", 1.0))
    with pytest.raises(ValueError, match="must not hold"):
        from_wire(wire("artifact", "../../etc/passwd", "x"))
    with pytest.raises(ValueError, match="fields"):
        from_wire({"kind": "metric"})
    with pytest.raises(ValueError, match="fields"):
        from_wire(["metric", "x", 1.0, 0, 1.0])
    with pytest.raises(ValueError, match="the year 9999"):
        from_wire(wire("metric", "x", 1.0, time=1e17))
    with pytest.raises(ValueError, match="more than the 6,000 allowed"):
        from_wire(wire("param", "p", "x" * 6001))
    with pytest.raises(TypeError, match="value must be a str"):
        from_wire(wire("tag", "t", 5))
    with pytest.raises(ValueError, match="is reserved"):
        from_wire(wire("tag", "mlflow.parentRunId", "x"))


def test_a_failed_call_does_not_move_the_automatic_steps(records: list[Record]) -> None:
    writer = MLflowWriter()
    with pytest.raises(TypeError):
        writer.log_metrics({"x": 1.0, "y": "bad"})
    writer.log_metric("x", 1.0)
    assert [(r.key, r.step) for r in records] == [("x", 0)]


def test_calls_after_the_site_finished_are_refused(tmp_path: Path) -> None:
    site = SiteContext("site-1", 0, 1, "job", "id", tmp_path, EventBus(), logging.getLogger("test"))
    token = run_as(site)
    try:
        site.close()
        with pytest.raises(FedstreamError, match="site-1 has finished"):
            MLflowWriter().log_metric("late", 1.0)
    finally:
        restore(token)
