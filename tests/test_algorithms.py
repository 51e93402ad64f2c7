"""FedProx, FedOpt and SCAFFOLD: the server's arithmetic against reference implementations written here, and
each reduced to FedAvg, bit for bit, on real training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedstream.config import load_job
from fedstream.errors import ConfigError
from fedstream.events import EventBus
from fedstream.messages import Task
from fedstream.pt.algorithms import SCAFFOLD_C, SCAFFOLD_DELTA_C, ProximalTerm, ScaffoldState
from fedstream.server.federation import Federation
from fedstream.server.models import ModelStore
from fedstream.site.context import SiteContext
from fedstream.site.executor import Executor, TaskOutput
from fedstream.workflows import FedAvg, FedOpt, Scaffold as ScaffoldWorkflow, Workflow
from fedstream.workflows.base import RoundCompleted, RoundSummary
from tests.helpers import hello_job, run_cli
from tests.local_link import LocalLink

START = {"w": np.zeros((3, 2), np.float32), "n": np.zeros(1, np.int64)}
SAMPLES = {"site-1": 1, "site-2": 3, "site-3": 4, "site-4": 8}  # powers of two in every total: exact means
DOWN = ("site-4", 2)  # site-4 fails in round 2


def step_of(site: str, round: int) -> np.ndarray:
    """What ``site`` adds to the global weights in ``round``: eighths, so that sums are exact."""
    rng = np.random.default_rng([int(site[-1]), round])
    return (rng.integers(-16, 17, (3, 2)) / 8).astype(np.float32)


def trained(site: str, round: int, weights: dict[str, np.ndarray], control: dict[str, np.ndarray] | None) -> Any:
    """A site's known answer: its weights, and (under SCAFFOLD) its control-variate change."""
    step = step_of(site, round)
    new = {"w": weights["w"] + step, "n": weights["n"] + int(site[-1])}
    extra = {} if control is None else {SCAFFOLD_DELTA_C: {"w": step / 2 - control["w"]}}
    return new, extra


class Known(Executor):
    def __init__(self, site: str, *, scaffold: bool = True) -> None:
        self.site, self.scaffold = site, scaffold  # scaffold=False: sends no control-variate change

    def setup(self, site: SiteContext) -> None:
        pass

    def execute(self, task: Task) -> TaskOutput:
        count = SAMPLES[self.site]
        if task.kind == "validate":
            return TaskOutput(count, {"accuracy": float(task.payload.weights["w"].mean())})
        if (self.site, task.round) == DOWN:
            raise RuntimeError(f"{self.site} is down")
        control = task.payload.extra.get(SCAFFOLD_C) if self.scaffold else None
        weights, extra = trained(self.site, task.round, task.payload.weights, control)
        return TaskOutput(count, {}, weights, extra)


def run(tmp_path: Path, workflow: FedAvg, *, no_control: str = "") -> tuple[dict[str, np.ndarray], list[RoundSummary]]:
    sites = sorted(SAMPLES)
    link = LocalLink([[site] for site in sites], lambda site: Known(site, scaffold=site != no_control), tmp_path)
    bus = EventBus()
    rounds: list[RoundSummary] = []
    bus.subscribe(RoundCompleted, lambda event: rounds.append(event.summary))
    federation = Federation(sites, bus)
    federation.start(link)
    models = ModelStore(tmp_path / "models")
    try:
        workflow.run(federation, models, START)
    finally:
        link.close()
    saved = torch.load(models.paths["global"])
    return {name: tensor.numpy() for name, tensor in saved.items()}, rounds


def reference(kind: str, rounds: int = 3, **hp: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The algorithms as the papers write them, one round after another: the global model and SCAFFOLD's c."""
    x = {name: array.copy() for name, array in START.items()}
    c = np.zeros((3, 2), np.float32)
    m = v = None
    for round in range(1, rounds + 1):
        answers = [
            (SAMPLES[site], *trained(site, round, x, {"w": c})) for site in sorted(SAMPLES) if (site, round) != DOWN
        ]
        total = sum(count for count, _, _ in answers)
        average = {name: sum(count * w[name].astype(np.float64) for count, w, _ in answers) / total for name in x}
        new_w = average["w"]
        if kind == "fedopt":
            delta = average["w"] - x["w"].astype(np.float64)
            lr = hp["server_lr"]
            if hp["optimizer"] == "sgd":
                m = delta if m is None else hp["momentum"] * m + delta
                new_w = x["w"] + lr * m
            else:
                m = (1 - hp["beta1"]) * delta if m is None else hp["beta1"] * m + (1 - hp["beta1"]) * delta
                v = np.full_like(delta, hp["tau"] ** 2) if v is None else v
                if hp["optimizer"] == "adagrad":
                    v = v + delta**2
                elif hp["optimizer"] == "adam":
                    v = hp["beta2"] * v + (1 - hp["beta2"]) * delta**2
                else:
                    v = v - (1 - hp["beta2"]) * delta**2 * np.sign(v - delta**2)
                new_w = x["w"] + lr * m / (np.sqrt(v) + hp["tau"])
        if kind == "scaffold":
            c = (c + sum(extra[SCAFFOLD_DELTA_C]["w"].astype(np.float64) for _, _, extra in answers) / 4).astype(
                np.float32
            )
        x = {"w": new_w.astype(np.float32), "n": np.rint(average["n"]).astype(np.int64)}
    return x, c


ARGS = {"num_rounds": 3, "min_clients": 3}


def test_fedavg_matches_the_reference(tmp_path: Path) -> None:
    weights, rounds = run(tmp_path, FedAvg(**ARGS))
    expected, _ = reference("fedavg")
    assert np.array_equal(weights["w"], expected["w"]) and np.array_equal(weights["n"], expected["n"])
    assert [r.num_samples for r in rounds] == [16, 8, 16]
    assert [f.site for f in rounds[1].failed] == ["site-4"]


@pytest.mark.parametrize(
    "hp",
    [
        {"optimizer": "sgd", "server_lr": 0.5, "momentum": 0.5},
        {"optimizer": "sgd", "server_lr": 1.5, "momentum": 0.0},
        {"optimizer": "adagrad", "server_lr": 0.1, "beta1": 0.9, "tau": 1e-3},
        {"optimizer": "adam", "server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
        {"optimizer": "yogi", "server_lr": 0.1, "beta1": 0.5, "beta2": 0.75, "tau": 1e-2},
    ],
)
def test_fedopt_matches_the_reference(tmp_path: Path, hp: dict[str, Any]) -> None:
    weights, _ = run(tmp_path, FedOpt(**ARGS, **hp))
    expected, _ = reference("fedopt", **{"momentum": 0.0, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, **hp})
    assert np.array_equal(weights["w"], expected["w"]), (weights["w"], expected["w"])
    assert np.array_equal(weights["n"], expected["n"]), "counters are averaged, not optimised"


def test_scaffold_matches_the_reference(tmp_path: Path) -> None:
    workflow = ScaffoldWorkflow(**ARGS)
    weights, _ = run(tmp_path, workflow)
    expected, control = reference("scaffold")
    assert np.array_equal(weights["w"], expected["w"])
    assert np.array_equal(workflow.control["w"], control) and control.any()


def test_scaffold_leaves_out_a_site_that_sends_no_control_variate(tmp_path: Path) -> None:
    _, rounds = run(tmp_path, ScaffoldWorkflow(num_rounds=1, min_clients=1), no_control="site-2")
    (failure,) = rounds[0].failed
    assert failure.site == "site-2" and "control-variate change (extra 'scaffold_delta_c')" in failure.reason
    assert rounds[0].clients == ["site-1", "site-3", "site-4"]


def test_fedopt_state_survives_a_checkpoint(tmp_path: Path) -> None:
    first = FedOpt(num_rounds=2, min_clients=3, optimizer="adam", server_lr=0.1)
    run(tmp_path, first)
    resumed = FedOpt(num_rounds=3, min_clients=3, optimizer="adam", server_lr=0.1)
    weights, rounds = run(tmp_path, resumed)  # the same model store: resumes after round 2
    assert [r.round for r in rounds] == [3]
    expected, _ = reference("fedopt", optimizer="adam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    assert np.array_equal(weights["w"], expected["w"])


def test_algorithm_arguments_are_checked_and_fedavg_s_are_inherited(tmp_path: Path) -> None:
    job = hello_job(tmp_path / "job", tmp_path)
    fedprox = ["server.workflow.path=fedstream.workflows.FedProx", "server.workflow.args.mu=-1.0"]
    with pytest.raises(ConfigError, match=r"server\.workflow\.args\.mu"):
        load_job(job, fedprox).component("server.workflow").build(Workflow)
    fedopt = ["server.workflow.path=fedstream.workflows.FedOpt", "server.workflow.args.optimizer=rmsprop"]
    with pytest.raises(ConfigError, match=r"server\.workflow\.args\.optimizer"):
        load_job(job, fedopt)
    with pytest.raises(ConfigError, match=r"server\.workflow\.args\.nonsense"):
        load_job(job, ["server.workflow.path=fedstream.workflows.Scaffold", "server.workflow.args.nonsense=1"])
    shown = load_job(job, ["server.workflow.path=fedstream.workflows.FedOpt"]).to_toml()
    assert 'optimizer = "sgd"' in shown and "num_rounds = 1" in shown and "min_clients = 1" in shown


def test_the_site_helpers_on_known_tensors() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    prox = ProximalTerm(model, 0.5)
    assert prox() == 0
    with torch.no_grad():
        model.weight.add_(torch.tensor([[1.0, -2.0]]))
    assert float(torch.as_tensor(prox()).detach()) == 0.5 / 2 * (1 + 4)
    assert ProximalTerm(model, 0.0)() == 0.0

    state = ScaffoldState()
    model.weight.grad = torch.tensor([[1.0, 1.0]])
    start = model.weight.detach().clone()
    correction = state.start(model, {SCAFFOLD_C: {"weight": np.array([[0.5, 0.25]], np.float32)}})
    correction.apply()
    assert model.weight.grad.tolist() == [[1.5, 1.25]]  # g + c - c_i, c_i still zero
    with torch.no_grad():
        model.weight.sub_(torch.tensor([[2.0, 4.0]]))
    delta = correction.finish(steps=2, lr=0.5)
    # c_i+ - c_i = (x - y) / (K lr) - c = [2, 4] / 1 - c
    assert delta["weight"].tolist() == [[1.5, 3.75]]
    assert state.control["weight"].tolist() == [[1.5, 3.75]]
    assert torch.equal(start - model.weight.detach(), torch.tensor([[2.0, 4.0]]))


def simulate_hello(tmp_path: Path, tiny_cifar: Path, name: str, sites: int, *overrides: str) -> dict[str, torch.Tensor]:
    job = hello_job(tmp_path / name, tiny_cifar, rounds=2)
    ws = tmp_path / f"ws-{name}"
    sets = [x for override in overrides for x in ("--set", override)]
    done = run_cli("simulate", str(job), "-w", str(ws), "-q", "-n", str(sites), *sets)
    assert done.returncode == 0, done.stdout + done.stderr
    loaded: dict[str, torch.Tensor] = torch.load(ws / "server" / "models" / "global.pt")
    return loaded


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_each_algorithm_reduces_to_fedavg_bit_for_bit(tmp_path: Path, tiny_cifar: Path) -> None:
    workflow = "server.workflow.path=fedstream.workflows."
    fedavg = simulate_hello(tmp_path, tiny_cifar, "fedavg", 2)
    assert same(
        fedavg, simulate_hello(tmp_path, tiny_cifar, "fedprox", 2, workflow + "FedProx", "server.workflow.args.mu=0.0")
    )
    plain_sgd = ("server.workflow.args.server_lr=1.0", "server.workflow.args.momentum=0.0")
    assert same(fedavg, simulate_hello(tmp_path, tiny_cifar, "fedopt", 2, workflow + "FedOpt", *plain_sgd))
    one_site = simulate_hello(tmp_path, tiny_cifar, "fedavg-1", 1)
    assert same(one_site, simulate_hello(tmp_path, tiny_cifar, "scaffold-1", 1, workflow + "Scaffold"))
    assert not same(fedavg, simulate_hello(tmp_path, tiny_cifar, "fedprox-1", 2, workflow + "FedProx"))
