"""Cross-site evaluation: the matrix on data where the answer is known, on its own from saved models, and
end to end into result.json, MLflow (read back with MlflowClient) and the summary."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from fedstream.errors import ConfigError, JobFailed
from fedstream.events import EventBus
from fedstream.messages import Task
from fedstream.server.federation import Federation
from fedstream.server.models import ModelStore
from fedstream.site.context import SiteContext
from fedstream.site.executor import Executor, TaskOutput
from fedstream.workflows import CrossSiteEval, FedAvg, Workflow
from fedstream.workflows.cross_site import CrossSiteEvaluated, CrossSiteMatrix
from tests.helpers import read_result, run_cli, write_job
from tests.local_link import LocalLink

START = {"w": np.zeros((2, 2), np.float32)}
ADDS = {"site-1": 1.0, "site-2": 2.0, "site-3": 4.0}  # what each site adds when it trains (1 sample each)


class Known(Executor):
    """Trains by adding its value; its "accuracy" of a model is the model's mean plus 10 times its index.
    ``broken``: it cannot validate a model whose mean is that value."""

    def __init__(self, site: str, broken: float | None = None) -> None:
        self.site, self.broken = site, broken

    def setup(self, site: SiteContext) -> None:
        pass

    def execute(self, task: Task) -> TaskOutput:
        w = task.payload.weights["w"]
        if task.kind == "train":
            return TaskOutput(1, {}, {"w": w + ADDS[self.site]})
        if self.broken is not None and float(w.mean()) == self.broken:
            raise RuntimeError(f"{self.site} cannot read this model")
        return TaskOutput(1, {"accuracy": float(w.mean()) + 10 * int(self.site[-1])})


def run(tmp_path: Path, workflow: Workflow, broken: dict[str, float] | None = None) -> CrossSiteMatrix:
    sites = sorted(ADDS)
    link = LocalLink([[site] for site in sites], lambda site: Known(site, (broken or {}).get(site)), tmp_path)
    bus = EventBus()
    found: list[CrossSiteMatrix] = []
    bus.subscribe(CrossSiteEvaluated, lambda event: found.append(event.matrix))
    federation = Federation(sites, bus)
    federation.start(link)
    try:
        workflow.run(federation, ModelStore(tmp_path / "models"), START)
    finally:
        link.close()
    (matrix,) = found
    return matrix


def test_every_site_validates_the_global_and_every_local_model(tmp_path: Path) -> None:
    matrix = run(tmp_path, FedAvg(num_rounds=2, min_clients=3, cross_site_eval=True))
    assert matrix.models == ["global", "site-1", "site-2", "site-3"]
    assert matrix.sites == ["site-1", "site-2", "site-3"]
    # global: 7/3 after round 1, 14/3 after round 2; site i's last local model: 7/3 + its value
    means = {"global": 14 / 3, "site-1": 7 / 3 + 1, "site-2": 7 / 3 + 2, "site-3": 7 / 3 + 4}
    for model, mean in means.items():
        expected = {site: pytest.approx(mean + 10 * int(site[-1]), abs=1e-5) for site in matrix.sites}
        assert {site: m["accuracy"] for site, m in matrix.metrics[model].items()} == expected
    assert matrix.failed == []
    assert sorted(p.name for p in (tmp_path / "models" / "local").iterdir()) == ["site-1.pt", "site-2.pt", "site-3.pt"]


def test_a_site_that_cannot_validate_a_model_leaves_a_hole_not_a_failed_job(tmp_path: Path) -> None:
    torch.save({"w": torch.full((2, 2), 3.0)}, tmp_path / "three.pt")
    torch.save({"w": torch.full((2, 2), 5.0)}, tmp_path / "five.pt")
    models = {"three": str(tmp_path / "three.pt"), "five": str(tmp_path / "five.pt")}
    matrix = run(tmp_path, CrossSiteEval(models=models), broken={"site-3": 5.0})
    assert matrix.models == ["three", "five"]
    assert matrix.metrics["three"] == {
        "site-1": {"accuracy": 13.0},
        "site-2": {"accuracy": 23.0},
        "site-3": {"accuracy": 33.0},
    }
    assert matrix.metrics["five"] == {"site-1": {"accuracy": 15.0}, "site-2": {"accuracy": 25.0}}
    (failure,) = matrix.failed
    assert failure.site == "site-3" and failure.phase == "cross-site validation of five"
    assert "site-3 cannot read this model" in failure.reason


def test_cross_site_eval_arguments_name_the_model(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2, 2)}, tmp_path / "m.pt")
    with pytest.raises(ConfigError, match=r"models\.\.\./x: a model's name is 1-64 letters"):
        CrossSiteEval(models={"../x": str(tmp_path / "m.pt")})
    with pytest.raises(ConfigError, match=r"models\.gone: no model file"):
        CrossSiteEval(models={"gone": str(tmp_path / "gone.pt")})
    with pytest.raises(ConfigError, match=r"models: name at least one model"):
        CrossSiteEval(models={})


def test_a_saved_model_of_another_shape_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"'w' has shape \(3, 3\), the model's is \(2, 2\)"):
        run(tmp_path, CrossSiteEval(models={"other": str(tmp_path / "other.pt")}))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(JobFailed, match=r"cannot read the model .*junk\.pt"):
        run(tmp_path, CrossSiteEval(models={"junk": str(tmp_path / "junk.pt")}))


MODEL = """
import torch


class Square(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 2))
"""

TRAINER = """
import torch

from fedstream import Trainer, TrainOutput, ValidationOutput


class Adds(Trainer):
    def train(self, task):
        with torch.no_grad():
            self.model.w.add_(self.site.index + 1)
        return TrainOutput(num_samples=1)

    def validate(self, task):
        return ValidationOutput(num_samples=1, metrics={"accuracy": float(self.model.w.mean()) + self.site.index})
"""


def test_the_matrix_reaches_result_json_mlflow_and_the_summary(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    job = write_job(
        tmp_path / "job",
        f"""
        name = "cross"
        [model]
        path = "square.Square"
        [server.workflow]
        path = "fedstream.workflows.FedAvg"
        [server.workflow.args]
        num_rounds = 1
        min_clients = 2
        cross_site_eval = true
        [server.receivers.mlflow]
        path = "fedstream.tracking.MLflowReceiver"
        [server.receivers.mlflow.args]
        tracking_uri = "sqlite:///{store}"
        [client.trainer]
        path = "adds.Adds"
        """,
        {"square.py": MODEL, "adds.py": TRAINER},
    )
    done = run_cli("simulate", str(job), "-w", str(tmp_path / "ws"), "-n", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"each site's last local model (2): {tmp_path / 'ws' / 'server' / 'models' / 'local'}/<site>.pt" in done.stdout
    )
    assert "cross-site accuracy" in done.stdout and "│ site-2       │ 2.0000 │ 3.0000 │" in done.stdout
    cross = read_result(tmp_path / "ws")["cross_site_eval"]
    # global 1.5; site-1's model 1, site-2's 2; validated on site-1 (+0) and site-2 (+1)
    assert cross["metrics"] == {
        "global": {"site-1": {"accuracy": 1.5}, "site-2": {"accuracy": 2.5}},
        "site-1": {"site-1": {"accuracy": 1.0}, "site-2": {"accuracy": 2.0}},
        "site-2": {"site-1": {"accuracy": 2.0}, "site-2": {"accuracy": 3.0}},
    }
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("cross").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert parent.data.metrics["cross_site/site-2/site-1/accuracy"] == 2.0
    assert parent.data.metrics["cross_site/global/site-2/accuracy"] == 2.5
    # the embedded store keeps artifacts beside it, where `mlflow ui` finds them
    (folder,) = (tmp_path / "mlartifacts").glob(f"*/{parent.info.run_id}/artifacts/cross_site_eval")
    assert sorted(path.name for path in folder.iterdir()) == ["accuracy.png", "matrix.csv"]
    rows = list(csv.DictReader(io.StringIO((folder / "matrix.csv").read_text())))
    assert len(rows) == 6 and {"model": "site-2", "site": "site-2", "metric": "accuracy", "value": "3.0"} in rows
    assert (folder / "accuracy.png").read_bytes().startswith(b"\x89PNG")
