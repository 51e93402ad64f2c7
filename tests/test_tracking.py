"""Streamed tracking end to end: sites log, the server writes MLflow and TensorBoard; read back with their own
readers (MlflowClient, EventAccumulator)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import REPO, read_result, run_cli, start_cli, wait_for, write_job
from tests.mlflow_server import MlflowServer, free_port

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

LOGGING = '''
import os
import time

import torch

from fedstream import Trainer, TrainOutput, ValidationOutput
from fedstream.tracking import MLflowWriter, SummaryWriter, WandBWriter

BASE_MS = 1_700_000_000_000


def stamp(site_index: int, round: int, i: int) -> int:
    return BASE_MS + site_index * 100_000 + round * 1000 + i


class Square(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


class LoggingTrainer(Trainer):
    """Logs a known set of records in every style; ``burst`` more log_metric calls in a tight loop."""

    def __init__(self, *, burst: int = 0, change_param: bool = False) -> None:
        self.burst, self.change_param = burst, change_param

    def train(self, task):
        mlflow, tb, wandb = MLflowWriter(), SummaryWriter(), WandBWriter()
        index, r = self.site.index, task.round
        for i in range(5):
            mlflow.log_metric("loss", float(10 * r + i), step=task.global_step(i, 5), timestamp=stamp(index, r, i))
        mlflow.log_metrics({"a": 1.0 * r, "b": 2.0 * r}, step=r, timestamp=stamp(index, r, 50))
        tb.add_scalar("tb_scalar", 0.5 * r, global_step=r, walltime=stamp(index, r, 60) / 1000)
        tb.add_scalars("grp", {"x": 1.0 * r, "y": 2.0 * r}, global_step=r, walltime=stamp(index, r, 70) / 1000)
        wandb.log({"wandb_metric": 3.0 * r}, step=r)
        mlflow.log_metric("auto", 1.0)
        mlflow.log_metric("auto", 2.0)
        mlflow.log_params({"lr": 0.2 if (self.change_param and r == 2) else 0.1, "site_name": self.site.name})
        mlflow.set_tag("site_tag", self.site.name)
        mlflow.set_tags({"last_round": r})
        mlflow.log_text(f"hello from {self.site.name} in round {r}", f"notes/round_{r}.txt")
        tb.add_text("tb_note", f"note {r}", r)
        for i in range(self.burst):
            mlflow.log_metric("burst", float(i), step=i)
        return TrainOutput(num_samples=10)

    def validate(self, task):
        return ValidationOutput(num_samples=10, metrics={"accuracy": 0.5 + 0.1 * task.round, "loss": 1.0 / task.round})


class GatedTrainer(LoggingTrainer):
    """Logs 200 ``gated`` metrics per round, then waits until the test creates ``<gate>/round-<r>``."""

    def __init__(self, *, gate: str) -> None:
        super().__init__()
        self.gate = gate

    def train(self, task):
        writer = MLflowWriter()
        for i in range(200):
            writer.log_metric("gated", float(i), step=task.global_step(i, 200))
        release = os.path.join(self.gate, f"round-{task.round}")
        while not os.path.exists(release):
            time.sleep(0.05)
        return TrainOutput(num_samples=10)
'''


def logging_job(tmp_path: Path, *, tracking_uri: str = "", trainer_args: str = "", mlflow_args: str = "") -> Path:
    return write_job(
        tmp_path / "logging",
        f"""
        name = "logging"
        description = "a job that logs known records"
        [model]
        path = "logging_trainer.Square"
        [server.workflow]
        path = "fedstream.workflows.FedAvg"
        [server.workflow.args]
        num_rounds = 2
        min_clients = 2
        [server.receivers.mlflow]
        path = "fedstream.tracking.MLflowReceiver"
        [server.receivers.mlflow.args]
        tracking_uri = "{tracking_uri}"
        experiment_name = "exp-{tmp_path.name}"
        run_name = "logging-run"
        {mlflow_args}
        [server.receivers.mlflow.args.experiment_tags]
        "mlflow.note.content" = "experiment description"
        [server.receivers.tensorboard]
        path = "fedstream.tracking.TensorBoardReceiver"
        [client.trainer]
        path = "logging_trainer.LoggingTrainer"
        [client.trainer.args]
        {trainer_args}
        """,
        {"logging_trainer.py": LOGGING},
    )


def gated_job(tmp_path: Path, *, tracking_uri: str = "", mlflow_args: str = "") -> tuple[Path, Path]:
    """The logging job whose trainer waits for files in its gate folder; returns (job, gate)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    job = logging_job(tmp_path, tracking_uri=tracking_uri, trainer_args=f'gate = "{gate}"', mlflow_args=mlflow_args)
    (job / "job.toml").write_text((job / "job.toml").read_text().replace("LoggingTrainer", "GatedTrainer"))
    return job, gate


def simulate(job: Path, ws: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    done = run_cli("simulate", str(job), "-w", str(ws), "-n", "2", "-t", "2", "-q", *args)
    assert (ws / "result.json").is_file(), done.stdout + done.stderr
    return done.returncode, read_result(ws), done.stdout + done.stderr


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]


def check_mlflow(result: dict[str, Any], ws: Path) -> None:
    """Everything the logging job logged, read back the way a user would: through ``mlflow ui`` started where
    the store is (for a store on this machine), or the tracking server."""
    tracking = result["tracking"]["mlflow"]
    uri = tracking["tracking_uri"]
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        assert tracking["view"] == f"cd {folder} && mlflow ui"
        ui = MlflowServer(folder).start()  # `mlflow ui` in that folder: its mlflow.db and ./mlartifacts
        try:
            check_runs(result, ws, MlflowClient(tracking_uri=ui.url))
        finally:
            ui.stop()
    else:
        check_runs(result, ws, MlflowClient(tracking_uri=uri))


def check_runs(result: dict[str, Any], ws: Path, client: MlflowClient) -> None:
    tracking = result["tracking"]["mlflow"]
    assert tracking["errors"] == [] and tracking["dropped"] == 0
    assert tracking["received"] == tracking["written"]
    experiment = client.get_experiment(tracking["experiment_id"])
    assert experiment.tags["mlflow.note.content"] == "experiment description"

    parent = client.get_run(tracking["parent_run_id"])
    assert parent.info.run_name == f"logging-run-{result['job_id']}"
    assert parent.data.tags["fedstream.job_id"] == result["job_id"]
    assert parent.data.tags["mlflow.note.content"] == "a job that logs known records"
    assert parent.info.status == "FINISHED"
    assert parent.data.params["server.workflow.args.num_rounds"] == "2"
    assert parent.data.params["client.trainer.path"] == "logging_trainer.LoggingTrainer"
    assert [(s, v) for s, v, _ in history(client, parent.info.run_id, "accuracy")] == [(1, 0.6), (2, 0.7)]
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "models")) == [
        "models/best.pt",
        "models/global.pt",
    ]

    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.info.run_name for run in children) == ["site-1", "site-2"]
    assert tracking["child_run_ids"] == {run.info.run_name: run.info.run_id for run in children}
    for run in children:
        site, index = run.info.run_name, int(run.info.run_name[-1]) - 1
        assert run.data.tags["site"] == site and run.data.tags["site_tag"] == site
        assert run.data.tags["last_round"] == "2"
        assert run.data.params == {"lr": "0.1", "site_name": site}
        assert run.info.status == "FINISHED"
        base = 1_700_000_000_000 + index * 100_000
        rid = run.info.run_id
        assert history(client, rid, "loss") == [
            (5 * (r - 1) + i, float(10 * r + i), base + r * 1000 + i) for r in (1, 2) for i in range(5)
        ]
        assert history(client, rid, "a") == [(1, 1.0, base + 1050), (2, 2.0, base + 2050)]
        assert history(client, rid, "tb_scalar") == [(1, 0.5, base + 1060), (2, 1.0, base + 2060)]
        assert [(s, v) for s, v, _ in history(client, rid, "grp/y")] == [(1, 2.0), (2, 4.0)]
        assert [(s, v) for s, v, _ in history(client, rid, "wandb_metric")] == [(1, 3.0), (2, 6.0)]
        assert [(s, v) for s, v, _ in history(client, rid, "auto")] == [(0, 1.0), (1, 2.0), (2, 1.0), (3, 2.0)]
        notes = sorted(a.path for a in client.list_artifacts(rid, "notes"))
        assert notes == ["notes/round_1.txt", "notes/round_2.txt"]
        (ws / f"dl-{site}").mkdir()
        local = client.download_artifacts(rid, "notes/round_2.txt", str(ws / f"dl-{site}"))
        assert Path(local).read_text() == f"hello from {site} in round 2"
        assert [a.path for a in client.list_artifacts(rid, "text/tb_note")] == [
            "text/tb_note/step_1.txt",
            "text/tb_note/step_2.txt",
        ]


def check_tensorboard(result: dict[str, Any]) -> None:
    tracking = result["tracking"]["tensorboard"]
    logdir = Path(tracking["logdir"])
    assert sorted(p.name for p in logdir.iterdir()) == ["server", "site-1", "site-2"]
    assert tracking["dropped"] == 0 and tracking["written"] == tracking["received"]
    for index, site in enumerate(["site-1", "site-2"]):
        events = EventAccumulator(str(logdir / site), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        base = 1_700_000_000 + index * 100
        loss = [(e.step, e.value, e.wall_time) for e in events.Scalars("loss")]
        assert [(s, v) for s, v, _ in loss] == [(5 * (r - 1) + i, float(10 * r + i)) for r in (1, 2) for i in range(5)]
        assert loss[0][2] == pytest.approx(base + 1.0, abs=1e-3), "the site's wall time is kept"
        assert [(e.step, e.value) for e in events.Scalars("grp/x")] == [(1, 1.0), (2, 2.0)]
        assert {"tb_note", "notes/round_1.txt", "param/lr", "tag/site_tag"} <= set(events.Tags()["tensors"])
        note = events.Tensors("tb_note")[1]
        assert (note.step, note.tensor_proto.string_val[0]) == (2, b"note 2")
    server = EventAccumulator(str(logdir / "server"), size_guidance={"scalars": 0})
    server.Reload()
    assert [(e.step, round(e.value, 6)) for e in server.Scalars("accuracy")] == [(1, 0.6), (2, 0.7)]


def test_embedded_store_holds_every_record(tmp_path: Path, tracking_store: Path) -> None:
    code, result, out = simulate(logging_job(tmp_path), tmp_path / "ws")
    assert code == 0, out
    assert result["tracking"]["mlflow"]["tracking_uri"] == f"sqlite:///{tracking_store / 'mlflow.db'}"
    check_mlflow(result, tmp_path / "ws")
    check_tensorboard(result)
    assert result["tracking"]["events"]["duplicates"] == {"site-1": 0, "site-2": 0}


def test_a_real_tracking_server_holds_every_record(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    code, result, out = simulate(logging_job(tmp_path, tracking_uri=mlflow_server.url), tmp_path / "ws")
    assert code == 0, out
    assert result["tracking"]["mlflow"]["tracking_uri"] == mlflow_server.url
    check_mlflow(result, tmp_path / "ws")
    assert "mlflow ui" not in out and mlflow_server.url in json.dumps(result["tracking"]["mlflow"]["view"])


def test_a_burst_of_fifty_thousand_calls_per_site_lands_in_order(tmp_path: Path) -> None:
    # The receivers hold at most 2,000 events: the burst must be slowed down, never dropped.
    job = logging_job(tmp_path, trainer_args="burst = 50000", mlflow_args="max_spool_records = 2000")
    code, result, out = simulate(
        job, tmp_path / "ws",
        "--set", "server.workflow.args.num_rounds=1",
        "--set", "server.receivers.tensorboard.args.max_pending=2000",
    )  # fmt: skip
    assert code == 0, out
    tracking = result["tracking"]["mlflow"]
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    for site, run_id in tracking["child_run_ids"].items():
        burst = client.get_metric_history(run_id, "burst")
        assert [(m.step, m.value) for m in burst] == [(i, float(i)) for i in range(50_000)], site
        times = [m.timestamp for m in burst]
        assert times == sorted(times), "logged in order"
        events = EventAccumulator(
            str(Path(result["tracking"]["tensorboard"]["logdir"]) / site), size_guidance={"scalars": 0}
        )
        events.Reload()
        assert [e.step for e in events.Scalars("burst")] == list(range(50_000))
    assert tracking["dropped"] == 0 and result["tracking"]["tensorboard"]["dropped"] == 0


def test_an_unreachable_tracking_server_fails_the_job_before_training(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, result, out = simulate(logging_job(tmp_path, tracking_uri=url), tmp_path / "ws")
    assert code == 1
    assert result["status"] == "failed"
    assert f"MLflow tracking at {url} is not usable" in result["error"]
    assert "required = false" in result["error"]
    assert result["rounds"] == [] and result["models"] == {}, "no training happened"
    assert "training" not in (tmp_path / "ws" / "site-1" / "log.txt").read_text()
    assert "not usable" in out


def test_optional_tracking_warns_and_reports(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    job = logging_job(tmp_path, tracking_uri=url, mlflow_args="required = false")
    code, result, _ = simulate(job, tmp_path / "ws")
    assert code == 3, "completed, but tracking lost records"
    assert result["status"] == "completed" and len(result["rounds"]) == 2
    mlflow = result["tracking"]["mlflow"]
    assert mlflow["written"] == 0 and mlflow["dropped"] == mlflow["received"] > 0
    assert "is not usable" in mlflow["errors"][0]
    assert result["tracking"]["tensorboard"]["dropped"] == 0


def test_a_changed_param_is_reported_not_fatal(tmp_path: Path) -> None:
    code, result, _ = simulate(logging_job(tmp_path, trainer_args="change_param = true"), tmp_path / "ws")
    assert code == 3
    mlflow = result["tracking"]["mlflow"]
    assert mlflow["dropped"] == 2, "one changed lr per site"
    assert any("param 'lr' is '0.1'; the new value '0.2' was not logged" in e for e in mlflow["errors"])
    client = MlflowClient(tracking_uri=mlflow["tracking_uri"])
    for run_id in mlflow["child_run_ids"].values():
        run = client.get_run(run_id)
        assert run.data.params["lr"] == "0.1"
        assert len(client.get_metric_history(run_id, "loss")) == 10, "the rest of the batch was written"


@pytest.mark.parametrize("job_name", ["hello-pt-mlflow", "hello-pt-tb-mlflow"])
def test_the_hello_pt_tracking_jobs(tmp_path: Path, tiny_cifar: Path, job_name: str) -> None:
    done = run_cli(
        "simulate", str(REPO / "jobs" / job_name), "-w", str(tmp_path / "ws"), "-n", "2", "-t", "2",
        "--set", f"client.trainer.args.data.root={tiny_cifar}", "--set", "server.workflow.args.num_rounds=2",
        "--set", "client.trainer.args.epochs=1",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = read_result(tmp_path / "ws")
    assert "&& mlflow ui" in done.stdout and "tensorboard --logdir" in done.stdout
    tracking = result["tracking"]["mlflow"]
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    steps_per_round = -(-150 // 32)  # 300 training samples split between 2 sites, batch 32
    for run_id in tracking["child_run_ids"].values():
        run = client.get_run(run_id)
        assert {"train_loss", "running_loss", "validation_accuracy"} <= set(run.data.metrics)
        assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(range(2 * steps_per_round))
        assert run.data.params["learning_rate"] == "0.01"
    parent = client.get_run(tracking["parent_run_id"])
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "accuracy")] == [1, 2]
    if job_name == "hello-pt-mlflow":
        run = client.get_run(tracking["child_run_ids"]["site-1"])
        assert run.data.tags["site"] == "site-1"
        store = Path(tracking["tracking_uri"].removeprefix("sqlite:///")).parent
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), "a location that survives moving the folder"
        notes = store / "mlartifacts" / run.info.artifact_uri.removeprefix("mlflow-artifacts:/") / "notes"
        assert sorted(path.name for path in notes.iterdir()) == ["round_1.txt", "round_2.txt"]
    check = EventAccumulator(
        str(Path(result["tracking"]["tensorboard"]["logdir"]) / "site-2"), size_guidance={"scalars": 0}
    )
    check.Reload()
    assert len(check.Scalars("train_loss")) == 2 * steps_per_round


def gated_count(server: MlflowServer) -> int:
    client = MlflowClient(tracking_uri=server.url)
    try:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return sum(len(client.get_metric_history(run.info.run_id, "gated")) for run in runs)
    except Exception:
        return -1


def test_tracking_server_restart_mid_run_loses_nothing(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "mlflow").start()
    job, gate = gated_job(
        tmp_path,
        tracking_uri=server.url,
        mlflow_args="http_max_retries = 0\nhttp_timeout_s = 5\nflush_interval_s = 0.2",
    )
    (job / "job.toml").write_text((job / "job.toml").read_text().replace("num_rounds = 2", "num_rounds = 3"))
    ws = tmp_path / "ws"
    process = start_cli("simulate", str(job), "-w", str(ws), "-n", "2", "-t", "2", "-q",
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: gated_count(server) == 400, "round 1's records on the tracking server")
        server.stop()
        (gate / "round-1").touch()
        server_log = ws / "server" / "log.txt"
        wait_for(lambda: "MLflow at" in server_log.read_text() and "failed" in server_log.read_text(), "the outage")
        wait_for(lambda: "round 2/3: training" in server_log.read_text(), "round 2")
        server.start()
        (gate / "round-2").touch()
        (gate / "round-3").touch()
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        server_was_running = server.process is not None
        server.stop()
    assert process.returncode == 0, output
    result = read_result(ws)
    mlflow = result["tracking"]["mlflow"]
    assert mlflow["dropped"] == 0 and mlflow["errors"] == [] and mlflow["written"] == mlflow["received"]
    assert server_was_running
    server.start()
    try:
        client = MlflowClient(tracking_uri=server.url)
        for site, run_id in mlflow["child_run_ids"].items():
            gated = client.get_metric_history(run_id, "gated")
            assert [(m.step, m.value) for m in gated] == [(i, float(i % 200)) for i in range(600)], site
        parent = mlflow["parent_run_id"]
        assert [m.step for m in client.get_metric_history(parent, "accuracy")] == [1, 2, 3]
        assert client.get_run(parent).info.status == "FINISHED"
    finally:
        server.stop()
    assert "is back" in (ws / "server" / "log.txt").read_text()


def stored_gated(db: Path) -> int:
    try:
        with sqlite3.connect(db) as connection:
            return int(connection.execute("SELECT COUNT(*) FROM metrics WHERE key = 'gated'").fetchone()[0])
    except sqlite3.Error:  # not created yet
        return -1


def processes_of(pid: int) -> list[int]:
    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def gone(pids: list[int]) -> bool:
    return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


def test_sigterm_leaves_a_result_and_killed_runs(tmp_path: Path, tracking_store: Path) -> None:
    job, _ = gated_job(tmp_path, mlflow_args="flush_interval_s = 0.2")
    ws = tmp_path / "ws"
    process = start_cli("simulate", str(job), "-w", str(ws), "-n", "2", "-t", "2", "-q",
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        server_log = ws / "server" / "log.txt"
        wait_for(lambda: server_log.is_file() and "MLflow: experiment" in server_log.read_text(), "MLflow to open")
        wait_for(lambda: stored_gated(tracking_store / "mlflow.db") == 400, "round 1's records in MLflow")
        children = processes_of(process.pid)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output
    result = read_result(ws)
    assert result["status"] == "failed" and result["error"] == "interrupted (SIGTERM)"
    mlflow = result["tracking"]["mlflow"]
    assert mlflow["received"] == mlflow["written"] + mlflow["dropped"] > 0, "every record is accounted for"
    client = MlflowClient(tracking_uri=mlflow["tracking_uri"])
    for run_id in [mlflow["parent_run_id"], *mlflow["child_run_ids"].values()]:
        assert client.get_run(run_id).info.status == "KILLED"
    wait_for(lambda: gone(children), "the workers and receivers to be gone")


@contextlib.contextmanager
def simulating_into_a_tracking_server(
    tmp_path: Path,
) -> Iterator[tuple[MlflowServer, Path, Path, subprocess.Popen[str]]]:
    """``simulate -v`` of the gated job (two rounds) logging to a real MLflow server that the test may pause: yields
    the server, the gate folder, the workspace and the process (killed after, if it still runs)."""
    server = MlflowServer(tmp_path / "mlflow").start()
    job, gate = gated_job(
        tmp_path,
        tracking_uri=server.url,
        mlflow_args="http_max_retries = 0\nhttp_timeout_s = 300\nflush_interval_s = 0.2\nstop_timeout_s = 600.0",
    )
    ws = tmp_path / "ws"
    process = start_cli("simulate", str(job), "-w", str(ws), "-n", "2", "-t", "2", "-v",
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: gated_count(server) == 400, "round 1's records on the tracking server")
        yield server, gate, ws, process
    finally:
        if process.poll() is None:
            process.kill()
        server.pause(False)
        server.stop()


def test_ctrl_c_while_waiting_for_a_hung_tracking_server_still_writes_the_result(tmp_path: Path) -> None:
    with simulating_into_a_tracking_server(tmp_path) as (server, gate, ws, process):
        server.pause()
        for r in (1, 2):
            (gate / f"round-{r}").touch()
        server_log = ws / "server" / "log.txt"
        wait_for(lambda: "waiting for mlflow to write" in server_log.read_text(), "the end-of-job wait", 300)
        began = time.monotonic()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
        assert time.monotonic() - began < 60, "Ctrl-C ends the wait"
    assert process.returncode == 3, output  # the job completed; tracking did not
    result = read_result(ws)
    assert result["status"] == "completed" and len(result["rounds"]) == 2
    mlflow = result["tracking"]["mlflow"]
    assert mlflow["dropped"] > 0 and mlflow["received"] == mlflow["written"] + mlflow["dropped"]
    assert any("did not close by its deadline" in error for error in mlflow["errors"]), mlflow["errors"]


def test_a_second_sigterm_does_not_cut_the_wait_for_tracking(tmp_path: Path) -> None:
    # A second SIGTERM while an interrupted job's end waited for a tracking backend stopped that wait, as a second
    # Ctrl-C does, and what was left was dropped; a poc killed with kill -9 sends its server SIGTERM several times
    # (once for each of poc's threads as it ends). SIGTERM now asks for a clean stop however often it comes.
    with simulating_into_a_tracking_server(tmp_path) as (server, gate, ws, process):
        server.pause()  # round 1's end is not written until the test lets the server go
        (gate / "round-1").touch()
        server_log = ws / "server" / "log.txt"
        wait_for(lambda: "round 2/2" in server_log.read_text(), "round 2")
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "waiting for mlflow to write" in server_log.read_text(), "the end-of-job wait", 300)
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "waiting for the tracking backends" in server_log.read_text(), "the second SIGTERM's effect")
        server.pause(False)
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    result = read_result(ws)
    assert result["error"] == "interrupted (SIGTERM)"
    mlflow = result["tracking"]["mlflow"]
    assert mlflow["dropped"] == 0 and mlflow["received"] == mlflow["written"] > 400, mlflow


def test_mlflow_history_piles_up_across_reruns_and_survives_moving_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # MLflow's default: mlflow.db where the command runs
    project = tmp_path / "project"
    project.mkdir()
    job = logging_job(tmp_path)
    results = []
    for _ in range(2):  # the same workspace twice: the second run must not wipe the first from MLflow
        done = run_cli("simulate", str(job), "-w", "ws", "-q", cwd=project)
        assert done.returncode == 0, done.stdout + done.stderr
        results.append(read_result(project / "ws"))
    assert {r["tracking"]["mlflow"]["tracking_uri"] for r in results} == {f"sqlite:///{project / 'mlflow.db'}"}
    moved = tmp_path / "moved"
    project.rename(moved)
    ui = MlflowServer(moved).start()  # what `cd moved && mlflow ui` serves
    try:
        client = MlflowClient(tracking_uri=ui.url)
        for result in results:
            mlflow = result["tracking"]["mlflow"]
            assert client.get_run(mlflow["parent_run_id"]).info.status == "FINISHED"
            run_id = mlflow["child_run_ids"]["site-1"]
            (tmp_path / run_id).mkdir()
            local = client.download_artifacts(run_id, "notes/round_2.txt", str(tmp_path / run_id))
            assert Path(local).read_text() == "hello from site-1 in round 2"
    finally:
        ui.stop()
