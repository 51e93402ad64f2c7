"""FedAvg with the federation and the site runtime, over a link in this process (no worker processes)."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from fedstream.config.schema import ForwardConfig
from fedstream.errors import JobFailed
from fedstream.events import EventBus
from fedstream.messages import Payload, Result, Task, Weights
from fedstream.server.dispatch import TaskDone
from fedstream.server.federation import Federation
from fedstream.server.models import ModelStore
from fedstream.site.context import SiteContext
from fedstream.site.executor import Executor, TaskOutput
from fedstream.site.host import SiteHost
from fedstream.site.site import Site
from fedstream.workflows import FedAvg
from fedstream.workflows.base import RoundCompleted, RoundSummary
from fedstream.workflows.fedavg import RoundUpdate
from tests.local_link import LocalLink, over_the_wire

START = {"w": np.zeros((2, 2), np.float32), "n": np.zeros(1, np.int64)}
# site -> (value added when training, number of samples)
VALUES = {"site-1": (1.0, 1), "site-2": (2.0, 3), "site-3": (4.0, 4)}


class Adder(Executor):
    """Adds its site's value to the weights; ``bad`` returns something wrong instead."""

    def __init__(self, site: str, bad: str = "", gate: threading.Event | None = None) -> None:
        self.site, self.bad, self.gate = site, bad, gate

    def setup(self, site: SiteContext) -> None:
        assert site.name == self.site

    def execute(self, task: Task) -> TaskOutput:
        value, count = VALUES[self.site]
        weights = dict(task.payload.weights)
        if task.kind == "validate":
            return TaskOutput(count, {"accuracy": float(weights["w"].mean()) * value})
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.bad == "raise":
            raise RuntimeError(f"{self.site} cannot train")
        weights["w"] = weights["w"] + value
        if self.bad == "nan":
            weights["w"][0, 0] = np.nan
        if self.bad == "shape":
            weights["w"] = np.zeros((3, 3), np.float32)
        if self.bad == "dtype":
            weights["w"] = weights["w"].astype(np.float64)
        if self.bad == "missing":
            del weights["n"]
        return TaskOutput(10**30 if self.bad == "samples" else count, {"train_loss": value}, weights)


def run(
    tmp_path: Path,
    *,
    bad: dict[str, str] | None = None,
    groups: list[list[str]] | None = None,
    gate: dict[str, threading.Event] | None = None,
    release_when_left_out: threading.Event | None = None,
    workflow: type[FedAvg] = FedAvg,
    **args: object,
) -> tuple[list[RoundSummary], ModelStore, LocalLink]:
    sites = sorted(VALUES)
    link = LocalLink(
        groups or [[site] for site in sites],
        lambda site: Adder(site, (bad or {}).get(site, ""), (gate or {}).get(site)),
        tmp_path,
    )
    bus = EventBus()
    rounds: list[RoundSummary] = []
    bus.subscribe(RoundCompleted, lambda event: rounds.append(event.summary))
    if release_when_left_out is not None:
        release = release_when_left_out
        bus.subscribe(TaskDone, lambda event: release.set() if event.reply.failure else None)
    federation = Federation(sites, bus)
    federation.start(link)
    models = ModelStore(tmp_path / "models")
    try:
        workflow(**{"num_rounds": 1, "min_clients": 2, **args}).run(federation, models, START)  # type: ignore[arg-type]
    finally:
        link.close()
    return rounds, models, link


def saved(models: ModelStore, name: str = "global") -> np.ndarray:
    return torch.load(models.paths[name])["w"].numpy()


def test_the_average_is_exact_and_weighted_by_samples(tmp_path: Path) -> None:
    rounds, models, _ = run(tmp_path, num_rounds=2)
    assert np.array_equal(saved(models), np.full((2, 2), 5.75, np.float32))  # 2.875, then 2.875 + 2.875
    first, second = rounds
    assert first.clients == ["site-1", "site-2", "site-3"] and first.num_samples == 8
    assert first.metrics["accuracy"] == 2.875 * 2.875 and second.metrics["accuracy"] == 5.75 * 2.875
    assert first.validated == ["site-1", "site-2", "site-3"] and first.failed == []


def test_a_round_lets_its_model_go_before_it_makes_the_next(tmp_path: Path) -> None:
    """The server does not hold the round's model and the new one at once (a model's worth of memory)."""
    held: list[bool] = []

    class Watched(FedAvg):
        def round_update(self, weights: Weights, sites: Sequence[str], scratch: Path) -> RoundUpdate:
            model = weakref.ref(weights["w"])

            class Update(RoundUpdate):
                def result(self) -> Weights:
                    gc.collect()
                    held.append(model() is not None)
                    return super().result()

            return Update(scratch)

    rounds, models, _ = run(tmp_path, num_rounds=3, workflow=Watched)
    assert len(rounds) == 3 and np.array_equal(saved(models), np.full((2, 2), 3 * 2.875, np.float32))
    assert held == [True, False, False]  # the first round's model is the job's initial one, which the caller has


@pytest.mark.parametrize(
    "bad, words",
    [
        ("nan", "'w' holds 1 NaN or infinite value(s)"),
        ("shape", "'w' has shape (3, 3), the model's is (2, 2)"),
        ("dtype", "'w' has dtype float64, the model's is float32"),
        ("missing", "missing ['n']"),
        ("samples", "num_samples must be from 1 to 1000000000 (max_samples)"),
        ("raise", "RuntimeError: site-3 cannot train"),
    ],
)
def test_a_bad_result_costs_only_its_own_site(tmp_path: Path, bad: str, words: str) -> None:
    (round_,), models, _ = run(tmp_path, bad={"site-3": bad})
    assert round_.clients == ["site-1", "site-2"], "the healthy sites are averaged"
    (failure,) = round_.failed
    assert (failure.site, failure.phase) == ("site-3", "train") and words in failure.reason, failure.reason
    assert np.array_equal(saved(models), np.full((2, 2), (1 * 1 + 3 * 2) / 4, np.float32))


def test_the_first_result_does_not_decide_what_is_right(tmp_path: Path) -> None:
    gate = {"site-2": threading.Event(), "site-3": threading.Event()}
    bad = {"site-1": "shape"}
    gate["site-2"].set()
    gate["site-3"].set()
    (round_,), _, _ = run(tmp_path, bad=bad, gate=gate)
    assert [f.site for f in round_.failed] == ["site-1"], "only the wrong-shaped site is blamed"


def test_with_min_clients_one_a_wrong_model_is_never_saved(tmp_path: Path) -> None:
    (round_,), models, _ = run(tmp_path, bad={"site-1": "shape"}, min_clients=1)
    assert round_.clients == ["site-2", "site-3"]
    assert saved(models).shape == (2, 2)
    with pytest.raises(JobFailed, match=r"only 0 of 3 sites answered and min_clients is 1"):
        run(tmp_path / "all", bad={site: "shape" for site in VALUES}, min_clients=1)
    assert not (tmp_path / "all" / "models" / "global.pt").exists()


def test_non_finite_weights_can_be_allowed(tmp_path: Path) -> None:
    (round_,), models, _ = run(tmp_path, bad={"site-3": "nan"}, reject_non_finite=False)
    assert round_.clients == ["site-1", "site-2", "site-3"] and np.isnan(saved(models)[0, 0])


def test_a_late_site_is_left_out_after_the_grace_period(tmp_path: Path) -> None:
    hold = threading.Event()
    (round_,), _, link = run(
        tmp_path,
        gate={"site-3": hold},
        release_when_left_out=hold,
        wait_after_min_clients_s=0.2,
        validate_on="sampled",
    )
    assert round_.clients == ["site-1", "site-2"]
    (failure,) = round_.failed
    assert failure.site == "site-3" and "left out: still running 0.2 s after" in failure.reason
    assert len(link.cancelled) == 1


def test_an_unknown_stop_condition_metric_fails_after_the_first_round(tmp_path: Path) -> None:
    with pytest.raises(JobFailed, match=r"stop_condition names 'acc', which is not among the validation metrics"):
        run(tmp_path, stop_condition="acc >= 0.5", num_rounds=3)


def test_a_key_metric_typo_fails_after_the_first_round(tmp_path: Path) -> None:
    with pytest.raises(JobFailed, match="key_metric 'acuracy' is not among the validation metrics"):
        run(tmp_path, key_metric="acuracy")


def test_an_abort_stops_the_workflow_at_once(tmp_path: Path) -> None:
    hold = threading.Event()
    sites = sorted(VALUES)
    link = LocalLink([[site] for site in sites], lambda site: Adder(site, gate=hold), tmp_path)
    bus = EventBus()
    federation = Federation(sites, bus)
    bus.subscribe(TaskDone, lambda event: None)
    federation.start(link)
    timer = threading.Timer(0.2, federation.abort, args=("receiver mlflow: cannot open",))
    timer.start()
    try:
        with pytest.raises(JobFailed, match="receiver mlflow: cannot open"):
            FedAvg(num_rounds=1, min_clients=2).run(federation, ModelStore(tmp_path / "m"), START)
        with pytest.raises(JobFailed, match="cannot open"):
            federation.dispatch("train", 1, 1, {}, 0.0)
    finally:
        hold.set()
        link.close()


def test_a_job_resumes_after_its_last_checkpoint(tmp_path: Path) -> None:
    # Two rounds, then the "server restarts" with the same models folder and four rounds in all: rounds 3
    # and 4 start from round 2's model, and the result is that of four uninterrupted rounds.
    run(tmp_path / "a", num_rounds=2)
    assert ModelStore(tmp_path / "a" / "models").last_round() == 2
    rounds, models, _ = run(tmp_path / "a", num_rounds=4)
    assert [r.round for r in rounds] == [3, 4]
    _, straight, _ = run(tmp_path / "b", num_rounds=4)
    assert np.array_equal(saved(models), saved(straight))
    assert np.array_equal(saved(models, "best"), saved(straight, "best"))


def test_the_best_model_is_kept_without_a_copy_and_stays_when_global_moves_on(tmp_path: Path) -> None:
    models = ModelStore(tmp_path / "models")
    models.save("global", {"w": np.full(3, 1.0, np.float32)})
    best = models.keep("best", "global")
    assert best.stat().st_ino == models.paths["global"].stat().st_ino, "a hard link, not a second write"
    models.save("global", {"w": np.full(3, 2.0, np.float32)})
    assert saved(models, "best").tolist() == [1.0, 1.0, 1.0] and saved(models).tolist() == [2.0, 2.0, 2.0]
    assert ModelStore(tmp_path / "models").paths.keys() == {"global", "best"}


def test_a_model_written_in_the_background_is_complete_when_read_and_its_error_fails_the_job(tmp_path: Path) -> None:
    models = ModelStore(tmp_path / "models")
    weights = {"w": np.arange(1 << 20, dtype=np.float32)}
    models.save("global", weights)
    assert np.array_equal(saved(models), weights["w"]), "paths waits for the write"
    models.save("odd", {"w": np.array(["text"])})  # any error of the write is the server's: the job fails
    with pytest.raises(JobFailed, match=r"cannot save the odd model to .*odd\.pt: TypeError: can't convert"):
        models.wait()
    # A model that cannot be written (its name taken by a folder) fails the job that saved it, naming the file.
    (tmp_path / "job" / "models" / "global.pt").mkdir(parents=True)
    with pytest.raises(JobFailed, match=r"cannot save the global model to .*global\.pt: .*directory"):
        run(tmp_path / "job")
    assert not list((tmp_path / "job" / "models").glob("*.partial")), "nothing half-written is left"


class Recording:
    """The SiteLink of a test that hands a host its tasks itself: it keeps what the host sends back, as the
    wire carries it (encoded when sent)."""

    def __init__(self) -> None:
        self.results: list[Result] = []

    def start(self, endpoint: object, sites: object) -> None:
        pass

    def send_result(self, result: Result) -> None:
        self.results.append(over_the_wire(result))

    def send_events(self, batch: object) -> None:
        pass

    def close(self) -> None:
        pass


class Counting(Executor):
    """Returns how many tasks it ran, as weights that are a view of its model; ``flaky`` fails its first run."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.model = np.zeros(2, np.float32)

    def setup(self, site: SiteContext) -> None:
        pass

    def execute(self, task: Task) -> TaskOutput:
        self.runs.append(task.id)
        if self.runs.count("flaky") == 1 and task.id == "flaky":
            raise RuntimeError("the first try fails")
        self.model[:] = len(self.runs)
        return TaskOutput(len(self.runs), weights={"w": self.model[:]})


def test_a_task_that_comes_again_is_answered_with_the_result_the_site_has(tmp_path: Path) -> None:
    # A server resumed after a restart sends the interrupted round's tasks again, under the same ids.
    executor, link = Counting(), Recording()
    context = SiteContext("site-1", 0, 1, "job", "id", tmp_path, EventBus(), logging.getLogger("site-1"))
    host = SiteHost(
        link,  # type: ignore[arg-type]
        ["site-1"],
        lambda name: Site(context, executor, lambda batch: None, ForwardConfig(), stall_timeout_s=5),
        keep_round_results=True,
    )
    serving = threading.Thread(target=host.serve)
    serving.start()
    sent = [("1.a", 1), ("1.a", 1), ("1.b", 1), ("1.a", 1), ("2.a", 2), ("2.b", 2), ("2.a", 2), ("1.a", 1)]
    for task_id, round in [*sent, ("flaky", 2), ("flaky", 2)]:
        host.task_received(Task(task_id, "site-1", "train", round, 2, Payload()))
    host.shutdown("done")
    serving.join(30)
    assert executor.runs == ["1.a", "1.b", "2.a", "2.b", "1.a", "flaky", "flaky"], "kept for the round, then dropped"
    answers = [(r.task_id, r.num_samples, r.weights["w"][0] if r.weights else None) for r in link.results]
    assert answers == [
        ("1.a", 1, 1.0),
        ("1.a", 1, 1.0),
        ("1.b", 2, 2.0),
        ("1.a", 1, 1.0),  # its weights were copied before 1.b overwrote the model
        ("2.a", 3, 3.0),
        ("2.b", 4, 4.0),
        ("2.a", 3, 3.0),  # copied into the memory of round 1's copy
        ("1.a", 5, 5.0),
        ("flaky", 0, None),  # a failure is tried again
        ("flaky", 7, 7.0),
    ]


def test_task_ids_say_what_the_task_is_so_that_a_resumed_server_sends_the_same_ones(tmp_path: Path) -> None:
    ids = []
    for server in ("first", "resumed"):
        link = LocalLink([["site-1"], ["site-2"]], lambda site: Adder(site), tmp_path / server)
        federation = Federation(["site-1", "site-2"], EventBus())
        federation.start(link)
        for kind in ("train", "validate", "validate"):
            dispatch = federation.dispatch(kind, 3, 4, {"site-1": Payload(), "site-2": Payload()}, 30)
            ids.append(sorted(dispatch.pending))
            while dispatch.next_reply() is not None:
                pass
        link.close()
    assert ids[0] == ["3.train.site-1.1", "3.train.site-2.1"] and ids[2] == [
        "3.validate.site-1.2",
        "3.validate.site-2.2",
    ]
    assert ids[:3] == ids[3:]
