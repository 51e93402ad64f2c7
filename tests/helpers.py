"""Test data and job folders, made by the tests themselves."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def tiny_cifar_batches(per_batch: int = 60, test: int = 200, seed: int = 0) -> dict[str, dict[bytes, Any]]:
    """CIFAR-10-shaped batches a small CNN learns quickly: each class is a bright block at its own place and
    colour, on noise. Same keys and types as the official files."""
    rng = np.random.default_rng(seed)

    def batch(count: int, label: str) -> dict[bytes, Any]:
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 70, (count, 3, 32, 32), dtype=np.uint8)
        for i, cls in enumerate(labels):
            row, col = (cls // 4) * 10, (cls % 4) * 8
            images[i, cls % 3, row : row + 10, col : col + 8] = 230
        return {
            b"batch_label": label.encode(),
            b"labels": [int(x) for x in labels],
            b"data": images.reshape(count, -1),
            b"filenames": [f"img_{label}_{i}.png".encode() for i in range(count)],
        }

    batches = {f"data_batch_{i}": batch(per_batch, f"training batch {i} of 5") for i in range(1, 6)}
    batches["test_batch"] = batch(test, "testing batch 1 of 1")
    return batches


def write_cifar_layout(root: Path, **kwargs: Any) -> Path:
    """Write ``root/cifar-10-batches-py`` in the official python layout; returns ``root``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in tiny_cifar_batches(**kwargs).items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    meta = {
        b"label_names": [
            c.encode()
            for c in (
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            )
        ]
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def cifar_archive(**kwargs: Any) -> bytes:
    """A ``cifar-10-python.tar.gz`` with the tiny batches, laid out like the official archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in tiny_cifar_batches(**kwargs).items():
            data = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_job(folder: Path, toml: str, files: dict[str, str] | None = None) -> Path:
    """A job folder with ``job.toml`` and the job's own Python modules."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(textwrap.dedent(toml))
    for name, code in (files or {}).items():
        (folder / name).write_text(textwrap.dedent(code))
    return folder


def hello_job(folder: Path, data_root: Path, *, rounds: int = 1, extra: str = "") -> Path:
    """The hello-pt job on test data."""
    return write_job(
        folder,
        f"""
        name = "hello-test"
        [model]
        path = "fedstream.examples.hello_pt.SimpleNetwork"
        [server.workflow]
        path = "fedstream.workflows.FedAvg"
        [server.workflow.args]
        num_rounds = {rounds}
        min_clients = 1
        [client.trainer]
        path = "fedstream.examples.hello_pt.HelloPTTrainer"
        [client.trainer.args]
        epochs = 1
        batch_size = 16
        [client.trainer.args.data]
        root = "{data_root}"
        partition = "iid"
        """
        + textwrap.dedent(extra),
    )


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m fedstream ARGS`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "fedstream", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def start_cli(*args: str, **popen: Any) -> subprocess.Popen[str]:
    """Start ``python -m fedstream ARGS`` and return at once (for tests that act while it runs)."""
    return subprocess.Popen([sys.executable, "-m", "fedstream", *args], cwd=REPO, text=True, **popen)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    """Poll ``condition`` until it holds: synchronisation on a state, never on a duration."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def read_result(workspace: Path) -> dict[str, Any]:
    return json.loads((workspace / "result.json").read_text())


TURNS = """
import os
import time

import torch

from fedstream import Trainer, TrainOutput, ValidationOutput
from fedstream.tracking import MLflowWriter


class Square(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 2))


class Wide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1024, 512))  # 2 MiB


class TurnTrainer(Trainer):
    \"\"\"Every task takes ``seconds``; in round 1, ``hang`` sites hang, ``crash`` sites kill their worker, and
    ``kill_client`` sites log ``progress`` at steps 0-299, then kill their deployed client (a SIGKILL of the
    parent, which this process does not outlive) before those events could leave; the task sent again to the
    restarted site logs steps 0-399 (the value is the run: 1 or 2) and trains normally; ``hold`` sites do the
    same but, instead of killing their client, wait to be killed with it. Each task logs ``turn`` at ``steps``
    steps of its own, and a text of ``text_kb`` thousand characters first.\"\"\"

    def __init__(
        self,
        *,
        seconds: float = 0.0,
        hang: list[str] = [],
        crash: list[str] = [],
        kill_client: list[str] = [],
        hold: list[str] = [],
        steps: int = 0,
        text_kb: int = 0,
    ) -> None:
        self.seconds, self.hang, self.crash, self.kill_client = seconds, hang, crash, kill_client
        self.hold = hold
        self.steps, self.text_kb = steps, text_kb

    def train(self, task):
        if self.text_kb:
            MLflowWriter().log_text("x" * 1000 * self.text_kb, "notes.txt")
        for step in range((task.round - 1) * self.steps, task.round * self.steps):
            MLflowWriter().log_metric("turn", float(step), step=step)
        if task.round == 1 and self.site.name in self.hang:
            time.sleep(600)
        if task.round == 1 and self.site.name in self.crash:
            os.kill(os.getpid(), 9)
        if task.round == 1 and self.site.name in self.kill_client + self.hold:
            killed = self.site.workspace / "killed"
            for step in range(400 if killed.exists() else 300):
                MLflowWriter().log_metric("progress", 2.0 if killed.exists() else 1.0, step=step)
            if not killed.exists():
                killed.touch()
                if self.site.name in self.kill_client:
                    os.kill(os.getppid(), 9)
                time.sleep(600)
        time.sleep(self.seconds)
        return TrainOutput(num_samples=1)

    def validate(self, task):
        return ValidationOutput(num_samples=1, metrics={"accuracy": 1.0})
"""


def turns_job(tmp_path: Path, *, rounds: int = 1, workflow_args: str = "", trainer_args: str = "") -> Path:
    return write_job(
        tmp_path / "turns",
        f"""
        name = "turns"
        [model]
        path = "turns.Square"
        [server.workflow]
        path = "fedstream.workflows.FedAvg"
        [server.workflow.args]
        num_rounds = {rounds}
        min_clients = 2
        {workflow_args}
        [client.trainer]
        path = "turns.TurnTrainer"
        [client.trainer.args]
        {trainer_args}
        """,
        {"turns.py": TURNS},
    )


PROC_STATUS = Path("/proc/self/status")


def anonymous_mb() -> float:
    """This process's anonymous resident memory (not the page cache's file pages), in MB (Linux)."""
    with PROC_STATUS.open() as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon:"))
