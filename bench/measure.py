"""Run a command and measure it: wall time, CPU time of its whole process tree, peak PSS summed over the tree."""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


# Benchmark (a): hello-pt with 2 sites x 5,000 training images, 1 local epoch, 2 rounds, batch 4, lr 0.001,
# validating on the 10,000 test images (--set overrides of the hello-pt jobs).
HELLO_A = [
    "server.workflow.args.num_rounds=2",
    "client.trainer.args.epochs=1",
    "client.trainer.args.data.partition=full",
    "client.trainer.args.data.max_train_samples=5000",
    "client.trainer.args.batch_size=4",
    "client.trainer.args.lr=0.001",
]


# Benchmark (c): a near-zero job, 1 round of 64 training and 64 validation images per site.
TINY = (
    "server.workflow.args.num_rounds=1",
    "client.trainer.args.data.partition=full",
    "client.trainer.args.data.max_train_samples=64",
    "client.trainer.args.data.max_val_samples=64",
)


@dataclass(frozen=True)
class Measurement:
    wall_s: float
    cpu_s: float
    peak_pss_mb: float
    peak_processes: int
    returncode: int


def _pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:  # the kernel's sum, cheaper than psutil's smaps parse
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def _tree_pss(root: psutil.Process) -> tuple[float, int]:
    total, count = 0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += _pss_kb(proc.pid)
            count += 1
        except (OSError, psutil.NoSuchProcess):
            pass
    return total / 1024, count


def measure(
    command: list[str],
    *,
    memory: bool = False,
    interval_s: float = 0.05,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> Measurement:
    """Run ``command`` to completion. With ``memory``, the tree's PSS is sampled every ``interval_s``
    seconds (which costs CPU: time such runs separately); otherwise peak PSS is reported as 0."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = log.open("w") if log else subprocess.DEVNULL
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    peak, peak_count = 0.0, 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_count
        root = psutil.Process(process.pid)
        while not stop.is_set():
            try:
                pss, count = _tree_pss(root)
            except psutil.NoSuchProcess:
                return
            peak, peak_count = max(peak, pss), max(peak_count, count)
            stop.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    if memory:
        sampler.start()
    returncode = process.wait()
    wall = time.perf_counter() - began
    stop.set()
    if memory:
        sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if log:
        out.close()  # type: ignore[union-attr]
    return Measurement(wall, cpu, peak, peak_count, returncode)


def cifar_root(out: Path) -> Path:
    """A CIFAR-10 python layout for benchmarks: ``$FEDSTREAM_CIFAR10`` or one made from ../shared/data."""
    given = os.environ.get("FEDSTREAM_CIFAR10")
    if given:
        return Path(given)
    root = out / "cifar10"
    if not (root / "cifar-10-batches-py" / "test_batch").is_file():
        tool = SHARED / "tools" / "cifar10-python-layout"
        if not tool.is_file():
            sys.exit(f"no CIFAR-10: set FEDSTREAM_CIFAR10 to a folder holding cifar-10-batches-py, or provide {tool}")
        subprocess.run([sys.executable, str(tool), str(root)], check=True)
    return root


def start(doc: str, out: Path) -> tuple[int, Path]:
    """Parse ``--repeat`` for a benchmark described by ``doc``; make ``out``; return (repeat, CIFAR-10 root)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"  # not ./mlflow.db in the checkout
    return args.repeat, cifar_root(out)


def fedstream(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedstream", *args]


def write_results(path: Path, lines: list[str]) -> None:
    """Write a results page (Markdown) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))
