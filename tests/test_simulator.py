"""``fedstream simulate`` end to end, in real worker processes."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from fedstream.examples.hello_pt import SimpleNetwork
from tests.helpers import hello_job, read_result, run_cli, start_cli, turns_job, wait_for, write_job

KNOWN = """
import os
import time

import torch

from fedstream import Trainer, TrainOutput, ValidationOutput

# site -> (value added to the global weights when training, number of samples)
VALUES = {"site-1": (1.0, 1), "site-2": (2.0, 3), "site-3": (4.0, 4)}


class Square(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 2))


class KnownTrainer(Trainer):
    def __init__(self, *, fail: list[str] = [], hang: list[str] = [], crash: list[str] = []) -> None:
        self.fail, self.hang, self.crash = fail, hang, crash

    def train(self, task):
        name = self.site.name
        if name in self.fail:
            raise RuntimeError(f"{name} cannot train")
        if name in self.hang:
            time.sleep(600)
        if name in self.crash:
            os.kill(os.getpid(), 9)
        value, count = VALUES[name]
        with torch.no_grad():
            self.model.w.add_(value)
        return TrainOutput(num_samples=count, metrics={"train_loss": value})

    def validate(self, task):
        value, count = VALUES[self.site.name]
        return ValidationOutput(num_samples=count, metrics={"accuracy": float(self.model.w.mean()) * value})
"""


def known_job(
    tmp_path: Path, *, rounds: int = 1, min_clients: int = 2, trainer_args: str = "", workflow_args: str = ""
) -> Path:
    return write_job(
        tmp_path / "known",
        f"""
        name = "known"
        [model]
        path = "known.Square"
        [server.workflow]
        path = "fedstream.workflows.FedAvg"
        [server.workflow.args]
        num_rounds = {rounds}
        min_clients = {min_clients}
        wait_after_min_clients_s = 60.0
        {workflow_args}
        [client.trainer]
        path = "known.KnownTrainer"
        [client.trainer.args]
        {trainer_args}
        """,
        {"known.py": KNOWN},
    )


def simulate(job: Path, ws: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    done = run_cli("simulate", str(job), "-w", str(ws), "-q", *args)
    assert (ws / "result.json").is_file(), done.stdout + done.stderr
    return done, read_result(ws)


def global_weights(ws: Path, name: str = "global") -> torch.Tensor:
    return torch.load(ws / "server" / "models" / f"{name}.pt")["w"]


def test_fedavg_is_exact_with_uneven_sample_counts(tmp_path: Path) -> None:
    done, result = simulate(known_job(tmp_path, rounds=2), tmp_path / "ws", "-n", "3", "-t", "3")
    assert done.returncode == 0, done.stderr
    # round 1: (1*1 + 3*2 + 4*4) / 8 = 2.875; round 2 trains from it: 2.875 + 2.875 = 5.75
    assert torch.equal(global_weights(tmp_path / "ws"), torch.full((2, 2), 5.75))
    first, second = result["rounds"]
    assert first["num_samples"] == second["num_samples"] == 8
    assert first["clients"] == ["site-1", "site-2", "site-3"]
    # validation weighted by samples: global * (1*1 + 3*2 + 4*4) / 8
    assert first["metrics"]["accuracy"] == 2.875 * 2.875
    assert second["metrics"]["accuracy"] == 5.75 * 2.875
    assert torch.equal(global_weights(tmp_path / "ws", "best"), torch.full((2, 2), 5.75))


def test_a_failing_site_is_left_out_and_named(tmp_path: Path) -> None:
    job = known_job(tmp_path, trainer_args='fail = ["site-3"]')
    done, result = simulate(job, tmp_path / "ws", "-n", "3", "-t", "3")
    assert done.returncode == 0, done.stderr
    (round_,) = result["rounds"]
    assert round_["clients"] == ["site-1", "site-2"]
    assert round_["failed"] == [{"site": "site-3", "phase": "train", "reason": "RuntimeError: site-3 cannot train"}]
    assert round_["validated"] == ["site-1", "site-2", "site-3"], "site-3 still validates the global model"
    assert torch.equal(global_weights(tmp_path / "ws"), torch.full((2, 2), (1 * 1 + 3 * 2) / 4))
    site_log = (tmp_path / "ws" / "site-3" / "log.txt").read_text()
    assert "Traceback" in site_log and "RuntimeError: site-3 cannot train" in site_log


def test_a_site_that_times_out_is_left_out(tmp_path: Path) -> None:
    job = known_job(tmp_path, trainer_args='hang = ["site-3"]', workflow_args="task_timeout_s = 2.0")
    began = time.monotonic()
    done, result = simulate(job, tmp_path / "ws", "-n", "3", "-t", "3")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - began < 60, "the hung site must not hold the job"
    (round_,) = result["rounds"]
    assert round_["failed"] == [{"site": "site-3", "phase": "train", "reason": "timed out after 2 s"}]
    assert round_["clients"] == ["site-1", "site-2"]
    assert torch.equal(global_weights(tmp_path / "ws"), torch.full((2, 2), 1.75))


def test_too_few_answers_fail_the_job_with_every_cause(tmp_path: Path) -> None:
    job = known_job(tmp_path, trainer_args='fail = ["site-2"]\ncrash = ["site-3"]')
    done, result = simulate(job, tmp_path / "ws", "-n", "3", "-t", "3")
    assert done.returncode == 1
    assert result["status"] == "failed"
    error = result["error"]
    assert re.search(r"round 1: train: only [01] of 3 sites answered and min_clients is 2", error), error
    assert "site-2: RuntimeError: site-2 cannot train" in error
    assert "site-3: its worker process exited unexpectedly (exit code -9)" in error
    assert "failed" in done.stdout and "site-2" in done.stdout


def test_twenty_clients_take_turns_on_two_workers(tmp_path: Path, tiny_cifar: Path) -> None:
    job = hello_job(tmp_path / "job", tiny_cifar, extra="max_train_samples = 8\nmax_val_samples = 8\n")
    done, result = simulate(job, tmp_path / "ws", "-n", "20", "-t", "2")
    assert done.returncode == 0, done.stderr
    assert len(result["rounds"][0]["clients"]) == 20
    log = (tmp_path / "ws" / "log.txt").read_text()
    workers = set(re.findall(r"worker \d+ \(pid (\d+)\) hosts", log))
    assert len(workers) == 2
    site_pids = {
        pid
        for site in range(1, 21)
        for pid in re.findall(r"site-\d+\[(\d+)\]", (tmp_path / "ws" / f"site-{site}" / "log.txt").read_text())
    }
    assert site_pids == workers, "every site ran inside one of the two workers"


def test_hello_pt_learns_and_leaves_a_complete_workspace(tmp_path: Path, tiny_cifar: Path) -> None:
    job = hello_job(tmp_path / "job", tiny_cifar, rounds=3)
    done = run_cli(
        "simulate",
        str(job),
        "-w",
        str(tmp_path / "ws"),
        "-n",
        "3",
        "-t",
        "2",
        "--set",
        "client.trainer.args.epochs=3",
        "--set",
        "client.trainer.args.batch_size=8",
        "--set",
        "client.trainer.args.lr=0.02",
    )
    assert done.returncode == 0, done.stderr
    ws = tmp_path / "ws"
    result = read_result(ws)
    assert result["status"] == "completed" and result["error"] is None
    assert result["clients"] == ["site-1", "site-2", "site-3"]
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3]
    for r in result["rounds"]:
        assert set(r) >= {"round", "duration_s", "clients", "num_samples", "metrics"}
        assert r["num_samples"] == 300 and r["duration_s"] > 0
    assert result["rounds"][-1]["metrics"]["accuracy"] > 0.5, result["rounds"]  # chance is 0.1
    assert result["timing"]["total_s"] >= result["timing"]["startup_s"] > 0
    assert set(result["models"]) == {"global", "best"}
    for path in result["models"].values():
        model = SimpleNetwork()
        model.load_state_dict(torch.load(path))
    for path in [
        ws / "log.txt",
        ws / "server" / "log.txt",
        ws / "server" / "job.toml",
        *(ws / f"site-{i}" / "log.txt" for i in (1, 2, 3)),
    ]:
        assert path.is_file(), path
    assert "accuracy" in done.stdout and "result.json" in done.stdout


FORGETFUL = """
import gc
import weakref

from fedstream.workflows import FedAvg


class Forgetful(FedAvg):
    \"\"\"FedAvg that fails the job when the initial model outlives the workflow's own reference to it.\"\"\"

    def run(self, federation, models, weights):
        initial = weakref.ref(weights["w"])
        copy = {name: array.copy() for name, array in weights.items()}
        del weights
        gc.collect()
        if initial() is not None:
            raise RuntimeError("the initial model is still held by the workflow's caller")
        super().run(federation, models, copy)
"""


def test_the_server_keeps_no_model_that_the_rounds_no_longer_need(tmp_path: Path) -> None:
    # a model of a GiB would otherwise stay in the server's memory for the whole job
    job = known_job(tmp_path)
    (job / "forgetful.py").write_text(FORGETFUL)
    edit = (job / "job.toml").read_text().replace('"fedstream.workflows.FedAvg"', '"forgetful.Forgetful"')
    (job / "job.toml").write_text(edit)
    done, result = simulate(job, tmp_path / "ws", "-n", "2", "-t", "2")
    assert done.returncode == 0 and result["status"] == "completed", result["error"]


def test_a_workspace_not_made_by_fedstream_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "thesis.tex").write_text("precious")
    done = run_cli("simulate", str(known_job(tmp_path)), "-w", str(tmp_path / "ws"), "-n", "3")
    assert done.returncode == 2 and "not made by fedstream" in done.stderr
    assert (tmp_path / "ws" / "thesis.tex").read_text() == "precious"


def test_rerun_in_the_same_workspace_replaces_the_previous_run(tmp_path: Path) -> None:
    job = known_job(tmp_path)
    simulate(job, tmp_path / "ws", "-n", "3", "-t", "3")
    done, result = simulate(job, tmp_path / "ws", "-c", "site-1,site-2", "-t", "2")
    assert done.returncode == 0
    assert not (tmp_path / "ws" / "site-3").exists()
    assert result["clients"] == ["site-1", "site-2"]


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT")
def test_ctrl_c_stops_everything_cleanly(tmp_path: Path) -> None:
    job = known_job(tmp_path, trainer_args='hang = ["site-1", "site-2"]')
    ws = tmp_path / "ws"
    process = start_cli("simulate", str(job), "-w", str(ws), "-n", "2", "-t", "2", "-q",
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    log = ws / "log.txt"

    def workers_started() -> bool:
        assert process.poll() is None, "the simulation ended before its workers started"
        return log.is_file() and log.read_text().count(") hosts site-") == 2

    wait_for(workers_started, "both workers to start")
    workers = [int(pid) for pid in re.findall(r"\(pid (\d+)\) hosts", log.read_text())]
    os.killpg(process.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, out + err
    result = read_result(ws)
    assert result["status"] == "failed" and "interrupted" in result["error"]
    for pid in workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"orphan {pid}"


def test_sites_waiting_for_their_turn_are_not_late(tmp_path: Path) -> None:
    # 8 sites on 2 workers, 0.5 s each: the last ones start 1.5 s after the first two answered, far more than
    # the 0.3 s grace; they are not late, since each takes no longer than the first ones did.
    job = turns_job(tmp_path, workflow_args="wait_after_min_clients_s = 0.3", trainer_args="seconds = 0.5")
    done, result = simulate(job, tmp_path / "ws", "-n", "8", "-t", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    (round_,) = result["rounds"]
    assert len(round_["clients"]) == 8 and round_["failed"] == []
    assert result["membership"] == []


def test_a_hung_site_is_stopped_and_the_sites_queued_behind_it_still_train(tmp_path: Path) -> None:
    job = turns_job(tmp_path, rounds=2, workflow_args="task_timeout_s = 2.0", trainer_args='hang = ["site-1"]')
    done, result = simulate(job, tmp_path / "ws", "-n", "4", "-t", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = result["rounds"]
    assert first["clients"] == ["site-2", "site-3", "site-4"], "site-3 shares site-1's worker"
    assert first["failed"] == [{"site": "site-1", "phase": "train", "reason": "timed out after 2 s"}]
    assert second["clients"] == ["site-1", "site-2", "site-3", "site-4"] and second["failed"] == []
    assert [(m["site"], "left" in m) for m in result["membership"]] == [
        ("site-1", True), ("site-3", True), ("site-1", False), ("site-3", False)
    ], "site-3 shared site-1's worker: both left with it and joined again"  # fmt: skip


def test_a_dead_worker_is_restarted_and_its_sites_rejoin(tmp_path: Path) -> None:
    job = turns_job(tmp_path, rounds=2, trainer_args='crash = ["site-2"]')
    done = run_cli("simulate", str(job), "-w", str(tmp_path / "ws"), "-n", "4", "-t", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    result = read_result(tmp_path / "ws")
    first, second = result["rounds"]
    reason = "its worker process exited unexpectedly (exit code -9)"
    assert first["failed"] == [{"site": "site-2", "phase": "train", "reason": reason}]
    assert first["clients"] == ["site-1", "site-3", "site-4"], "site-4 shares site-2's worker"
    assert second["clients"] == ["site-1", "site-2", "site-3", "site-4"]
    left = [m for m in result["membership"] if "left" in m]
    assert [m["site"] for m in left] == ["site-2", "site-4"] and "exited with code -9" in left[0]["left"]
    assert "site-2 left (worker exited with code -9)" in done.stdout


def test_a_worker_that_cannot_start_again_is_given_up_and_its_sites_fail(tmp_path: Path) -> None:
    # site-2 kills its worker; the job's code cannot be imported in a fresh process (forked workers inherit it,
    # a restarted one spawns), so worker 1 (site-2 and site-4) never joins again. Before, it was started again
    # and again, for ever, and its sites' tasks waited.
    job = turns_job(tmp_path, rounds=2, trainer_args='crash = ["site-2"]')
    code = (job / "turns.py").read_text()
    guard = "import multiprocessing\nif multiprocessing.parent_process():\n    raise ImportError('not in a worker')\n"
    (job / "turns.py").write_text(guard + code)
    done = run_cli("simulate", str(job), "-w", str(tmp_path / "ws"), "-n", "4", "-t", "2", "-q", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    first, second = read_result(tmp_path / "ws")["rounds"]
    reason = "worker 1 could not start, 3 times in a row (exit code 1; its error is on the terminal and in log.txt)"
    sites = ("site-2", "site-4")
    given_up = [{"site": site, "phase": phase, "reason": reason} for phase in ("train", "validate") for site in sites]
    killed = given_up[0] | {"reason": "its worker process exited unexpectedly (exit code -9)"}
    assert first["failed"] == [killed, *given_up[1:]]
    assert second["failed"] == given_up and second["clients"] == ["site-1", "site-3"]
    assert done.stderr.count("cannot import module 'turns' for 'turns.Square': not in a worker") == 3, done.stderr


def test_a_worker_hosting_more_sites_than_it_may_open_files_logs_for_each(tmp_path: Path) -> None:
    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    job = turns_job(tmp_path)
    code = (job / "turns.py").read_text()
    printing = "def train(self, task):\n        print('trains')\n"
    (job / "turns.py").write_text(code.replace("def train(self, task):\n", printing))
    done = subprocess.run(
        [sys.executable, "-m", "fedstream", "simulate", str(job), "-w", str(tmp_path / "ws"), "-n", "600", "-q"],
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=few_files,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (round_,) = read_result(tmp_path / "ws")["rounds"]
    assert len(round_["clients"]) == 600
    for site in ("site-1", "site-300", "site-600"):
        assert f"{site}[" in (tmp_path / "ws" / site / "log.txt").read_text(), site  # its print, as a record


def test_a_thousand_sites_take_turns_with_default_settings(tmp_path: Path, tiny_cifar: Path) -> None:
    job = hello_job(
        tmp_path / "job",
        tiny_cifar,
        extra="max_train_samples = 64\nmax_val_samples = 64\n",
    )
    done, result = simulate(
        job,
        tmp_path / "ws",
        "-n", "1000", "-t", "2",
        "--set", "client.trainer.args.data.partition=full",
        "--set", "server.workflow.args.min_clients=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (round_,) = result["rounds"]
    assert len(round_["clients"]) == 1000 and round_["failed"] == []
