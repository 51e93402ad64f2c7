"""The client API (``fedstream.client``): plain training scripts as a job's site code, in both modes."""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from fedstream.config import load_job
from fedstream.errors import ConfigError
from tests.helpers import REPO, hello_job, read_result, run_cli, write_job

SCRIPT = """
import os
import signal
import subprocess
import sys
import threading

import torch

from fedstream import client as fl, mlflow

site_name, misbehaving, behaviour = sys.argv[1], sys.argv[2], sys.argv[3]
print("torch threads", torch.get_num_threads())
fl.init()
value = {"site-1": 1.0, "site-2": 2.0}[fl.site().name]
assert fl.site().name == site_name
while fl.running():
    task = fl.receive()
    w = task.weights["w"]
    if task.is_validate:
        fl.send(num_samples=int(value), metrics={"accuracy": float(w.mean())})
        continue
    bad = site_name == misbehaving and task.round == 2
    if bad and behaviour == "crash":
        print("about to divide by zero")
        1 / 0
    if bad and behaviour == "exit":
        print("leaving early")
        sys.exit(3)
    if bad and behaviour == "kill":
        print("killing myself")
        os.kill(os.getpid(), signal.SIGKILL)
    if bad and behaviour == "bad-dtype":
        fl.send({"w": w.numpy().astype("U4")}, num_samples=1)
    if bad and behaviour == "receive-twice":
        fl.receive()
    if bad and behaviour == "orphan":  # a helper left running, which keeps the script's output open too
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(fl.site().workspace)])
    thread = threading.Thread(target=mlflow.log_metric, args=("from_thread", value), kwargs={"step": task.round})
    thread.start()
    thread.join()
    mlflow.log_metric("value", value, step=task.round)
    fl.send({"w": w + value}, num_samples=int(value), metrics={"train_loss": value})
    if bad and behaviour == "send-twice":
        fl.send({"w": w}, num_samples=1)
print("script done")
"""

MODEL = """
import torch


class Square(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 2))
"""


def script_job(tmp_path: Path, mode: str, *, misbehaving: str = "nobody", behaviour: str = "", rounds: int = 3) -> Path:
    return write_job(
        tmp_path / "job",
        f"""
        name = "script"
        [model]
        path = "square.Square"
        [server.workflow]
        path = "fedstream.workflows.FedAvg"
        [server.workflow.args]
        num_rounds = {rounds}
        min_clients = 1
        wait_after_min_clients_s = 60.0
        [server.receivers.tensorboard]
        path = "fedstream.tracking.TensorBoardReceiver"
        [client.script]
        path = "train.py"
        args = ["{{site}}", "{misbehaving}", "{behaviour}"]
        mode = "{mode}"
        """,
        {"train.py": SCRIPT, "square.py": MODEL},
    )


def simulate(job: Path, ws: Path, *args: str) -> dict:
    done = run_cli("simulate", str(job), "-w", str(ws), "-q", "-n", "2", "-t", "2", *args)
    assert (ws / "result.json").is_file(), done.stdout + done.stderr
    return read_result(ws)


def failures(result: dict, phase: str = "train") -> dict[int, list[dict]]:
    """Per round, the sites that failed its ``phase`` tasks."""
    found: dict[int, list[dict]] = {}
    for entry in result["rounds"]:
        for failure in entry["failed"]:
            if failure["phase"] == phase:
                found.setdefault(entry["round"], []).append(failure)
    return found


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_script_trains_validates_and_logs_from_its_threads(tmp_path: Path, mode: str) -> None:
    result = simulate(script_job(tmp_path, mode, rounds=2), tmp_path / "ws")
    assert result["status"] == "completed", result["error"]
    weights = torch.load(tmp_path / "ws" / "server" / "models" / "global.pt")["w"]
    # each round adds (1 * 1 + 2 * 2) / 3 to every weight
    assert torch.allclose(weights, torch.full((2, 2), 2 * 5 / 3))
    assert [entry["metrics"]["accuracy"] for entry in result["rounds"]] == pytest.approx([5 / 3, 10 / 3])
    # two metrics per round and site, one of them from a thread the script started: all delivered and written
    assert result["tracking"]["events"]["received"] == {"site-1": 4, "site-2": 4}
    board = result["tracking"]["tensorboard"]
    assert board["written"] == board["received"] and board["dropped"] == 0
    log = (tmp_path / "ws" / "site-1" / "log.txt").read_text()
    assert "script done" in log
    # the worker's share of the cores, also in a process of its own (PyTorch's default would take them all)
    assert f"torch threads {max(1, (os.cpu_count() or 1) // 2)}" in log


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_crashing_script_fails_its_site_with_its_last_output(tmp_path: Path, mode: str) -> None:
    result = simulate(script_job(tmp_path, mode, misbehaving="site-2", behaviour="crash"), tmp_path / "ws")
    assert result["status"] == "completed", result["error"]
    failed = failures(result)
    assert sorted(failed) == [2, 3]
    (crash,) = failed[2]
    assert crash["site"] == "site-2" and crash["phase"] == "train"
    assert "about to divide by zero" in crash["reason"]
    assert "ZeroDivisionError" in crash["reason"] or "exited with code 1" in crash["reason"]
    assert "without answering the train task of round 2" in crash["reason"]
    assert "train.py" in failed[3][0]["reason"] and "before this task" in failed[3][0]["reason"]
    assert [f["site"] for f in failures(result, "validate")[2]] == ["site-2"]
    assert result["rounds"][2]["clients"] == ["site-1"]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_script_that_exits_early_fails_its_later_tasks(tmp_path: Path, mode: str) -> None:
    result = simulate(script_job(tmp_path, mode, misbehaving="site-1", behaviour="exit"), tmp_path / "ws")
    (early,) = failures(result)[2]
    assert early["site"] == "site-1"
    assert ("sys.exit(3)" if mode == "thread" else "exited with code 3") in early["reason"]
    assert "leaving early" in early["reason"]


def test_a_killed_script_process_fails_its_task_and_the_site_goes_on(tmp_path: Path) -> None:
    result = simulate(script_job(tmp_path, "process", misbehaving="site-2", behaviour="kill"), tmp_path / "ws")
    assert result["status"] == "completed", result["error"]
    (killed,) = failures(result)[2]
    assert "train.py was killed by signal 9 without answering the train task of round 2" in killed["reason"]
    assert "killing myself" in killed["reason"]
    assert result["membership"] == [], "the site's own process lives on"


def test_what_a_script_process_leaves_running_ends_with_it(tmp_path: Path) -> None:
    result = simulate(script_job(tmp_path, "process", misbehaving="site-2", behaviour="orphan"), tmp_path / "ws")
    assert result["status"] == "completed" and failures(result) == {}, result
    left = [
        process.info["cmdline"]
        for process in psutil.process_iter(["cmdline"])
        if str(tmp_path) in " ".join(process.info["cmdline"] or [])
    ]
    assert left == []


def test_weights_that_cannot_travel_are_refused_at_the_call(tmp_path: Path) -> None:
    result = simulate(script_job(tmp_path, "thread", misbehaving="site-2", behaviour="bad-dtype"), tmp_path / "ws")
    (failure,) = failures(result)[2]
    assert "TypeError: fl.send(): weights['w'] has dtype <U4, which cannot be sent (train.py, line" in failure["reason"]
    assert result["membership"] == [], "the worker lives on"


def test_a_script_that_asks_for_a_task_before_answering_fails_that_task(tmp_path: Path) -> None:
    result = simulate(script_job(tmp_path, "thread", misbehaving="site-2", behaviour="receive-twice"), tmp_path / "ws")
    (failure,) = failures(result)[2]
    assert "receive() was called before send() answered the train task of round 2" in failure["reason"]


def test_a_script_that_answers_twice_fails_at_its_second_answer(tmp_path: Path) -> None:
    result = simulate(script_job(tmp_path, "thread", misbehaving="site-2", behaviour="send-twice"), tmp_path / "ws")
    failed = failures(result)
    assert sorted(failed) == [3]  # round 2's answer counted; the second send() ended the script
    assert "send() without a task to answer" in failed[3][0]["reason"]


def test_a_script_and_a_trainer_give_the_same_model(tmp_path: Path, tiny_cifar: Path) -> None:
    trainer_job = hello_job(tmp_path / "trainer", tiny_cifar, rounds=2)
    script_folder = tmp_path / "script"
    shutil.copytree(REPO / "jobs" / "hello-pt-mlflow-script", script_folder)
    args = ["--epochs", "1", "--batch-size", "16", "--data-root", str(tiny_cifar), "--shard", "{index}",
            "--num-shards", "{num_sites}"]  # fmt: skip
    overrides = [
        f"client.script.args={args!r}".replace("'", '"'),
        "server.workflow.args.num_rounds=2",
        "server.workflow.args.min_clients=1",
        "server.receivers.mlflow.args.required=false",
    ]
    for folder, extra in ((trainer_job, []), (script_folder, [x for o in overrides for x in ("--set", o)])):
        done = run_cli("simulate", str(folder), "-w", str(tmp_path / f"ws-{folder.name}"), "-q", "-n", "2", *extra)
        assert done.returncode == 0, done.stdout + done.stderr
    models = [tmp_path / f"ws-{name}" / "server" / "models" / "global.pt" for name in ("trainer", "script")]
    trained = [torch.load(path) for path in models]
    assert trained[0].keys() == trained[1].keys()
    for name, tensor in trained[0].items():
        assert torch.allclose(tensor, trained[1][name], atol=1e-6, rtol=0), name


def test_the_federated_script_differs_from_the_plain_one_in_at_most_ten_lines() -> None:
    folder = REPO / "jobs" / "hello-pt-mlflow-script"
    plain = (folder / "train_plain.py").read_text().splitlines()
    federated = (folder / "train.py").read_text().splitlines()
    changed = [
        line
        for line in difflib.unified_diff(plain, federated, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert 0 < len(changed) <= 10, "\n".join(changed)


def test_a_script_run_outside_a_job_says_how_to_run_it(tmp_path: Path) -> None:
    job = script_job(tmp_path, "thread")
    done = subprocess.run(
        [sys.executable, str(job / "train.py"), "site-1", "x", "y"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "name the script in the job's [client.script]" in done.stderr


def test_script_config_errors_name_the_key(tmp_path: Path) -> None:
    job = script_job(tmp_path, "thread")
    with pytest.raises(ConfigError, match=r"client\.script\.path.*no missing\.py"):
        load_job(job, ["client.script.path=missing.py"])
    with pytest.raises(ConfigError, match=r"client\.script\.path.*inside the job folder"):
        load_job(job, ["client.script.path=../train.py"])
    with pytest.raises(ConfigError, match=r"client.*either \[client\.trainer\]"):
        load_job(job, ["client.trainer.path=square.Square"])
    (job / "broken.py").write_text("def train(:\n")
    with pytest.raises(ConfigError, match=r"client\.script\.path: broken\.py is not valid Python: .* \(line 1\)"):
        load_job(job, ["client.script.path=broken.py"])
    with pytest.raises(ConfigError, match=r"client\.script\.mode"):
        load_job(job, ["client.script.mode=fork"])
    shown = load_job(job).to_toml()
    assert "[client.script]" in shown and "trainer" not in shown


def test_a_script_job_runs_the_same_under_poc(tmp_path: Path) -> None:
    """The deployment runs the script job unchanged (here in process mode): the same model as the simulator."""
    job = script_job(tmp_path, "process", rounds=2)
    simulated = simulate(job, tmp_path / "sim")
    deployed = run_cli("poc", str(job), "-w", str(tmp_path / "poc"), "-n", "2", "--threads", "1")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    (workspace,) = (tmp_path / "poc" / "server" / "jobs").iterdir()
    result = read_result(workspace)
    assert result["status"] == "completed"
    assert [r["metrics"] for r in result["rounds"]] == [r["metrics"] for r in simulated["rounds"]]
    assert result["tracking"]["events"]["received"] == {"site-1": 4, "site-2": 4}
    models = [path / "server" / "models" / "global.pt" for path in (tmp_path / "sim", workspace)]
    assert torch.equal(*(torch.load(path)["w"] for path in models))
