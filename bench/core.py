"""Benchmark of the core runtime on real CIFAR-10; writes bench/results/core.md.

    python bench/core.py [--repeat 3]

(a) hello-pt: 2 clients x 5,000 training images, 1 local epoch, 2 rounds, batch 4, lr 0.001, validation on
    the 10,000 test images, -t 2;
(b) the same training and validation as a plain PyTorch script, 2 processes, no fedstream;
(c) a near-zero job: 1 round, 64 training and 64 validation images per client, 2 clients;
(d) 100 clients, -t 2, 1 round, 64 images each.
Runs alternate (b, a, c, d, b, a, ...) so that a noisy machine affects all alike; medians are reported.
Each scenario runs twice per repeat: once for time, once with the memory sampler, whose own CPU use would
otherwise slow the timed run.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import sys
from pathlib import Path

from measure import HELLO_A, REPO, TINY, Measurement, fedstream, measure, start, write_results

OUT = REPO / "bench" / "out"
RESULTS = REPO / "bench" / "results" / "core.md"


def hello(ws: Path, data: Path, clients: int, *sets: str) -> list[str]:
    args = [
        "simulate",
        str(REPO / "jobs" / "hello-pt"),
        "-w",
        str(ws),
        "-n",
        str(clients),
        "-t",
        "2",
        "-q",
        "--set",
        f"client.trainer.args.data.root={data}",
    ]
    for item in sets:
        args += ["--set", item]
    return fedstream(*args)


def scenarios(data: Path) -> dict[str, list[str]]:
    return {
        "b": [
            sys.executable,
            str(REPO / "bench" / "plain_pytorch.py"),
            str(data),
            "--processes",
            "2",
            "--train",
            "5000",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "0.001",
        ],
        "a": hello(OUT / "ws-a", data, 2, *HELLO_A),
        "c": hello(OUT / "ws-c", data, 2, *TINY),
        "d": hello(OUT / "ws-d", data, 100, *TINY, "server.workflow.args.min_clients=2"),
    }


def main() -> None:
    repeat, data = start(__doc__, OUT)
    runs: dict[str, list[Measurement]] = {name: [] for name in "bacd"}
    commands = scenarios(data)
    for i in range(repeat):
        for name, command in commands.items():
            timed = memory = None
            for sampled in (False, True):
                shutil.rmtree(OUT / f"ws-{name}", ignore_errors=True)
                run = measure(command, memory=sampled, log=OUT / f"{name}-{i}.log")
                if run.returncode:
                    sys.exit(f"({name}) failed with exit code {run.returncode}; see {OUT / f'{name}-{i}.log'}")
                memory, timed = (run, timed) if sampled else (memory, run)
            assert timed is not None and memory is not None
            result = Measurement(timed.wall_s, timed.cpu_s, memory.peak_pss_mb, memory.peak_processes, 0)
            runs[name].append(result)
            print(
                f"({name}) run {i + 1}: {result.wall_s:.2f} s wall, {result.cpu_s:.2f} s CPU, "
                f"{result.peak_pss_mb:.0f} MB peak PSS, {result.peak_processes} processes",
                flush=True,
            )

    def median(name: str, field: str) -> float:
        return statistics.median(getattr(m, field) for m in runs[name])

    ratio = statistics.median(a.wall_s / b.wall_s for a, b in zip(runs["a"], runs["b"], strict=True))
    labels = {
        "a": "(a) hello-pt, 2 x 5,000 images, 2 rounds, bs 4",
        "b": "(b) plain PyTorch, same work",
        "c": "(c) near-zero job, 2 clients",
        "d": "(d) 100 clients, -t 2, 64 images each",
    }
    lines = [
        "# Core runtime benchmark",
        "",
        f"Command: `python bench/core.py --repeat {repeat}` on {platform.node() or 'this machine'} "
        f"({platform.processor() or platform.machine()}, Python {platform.python_version()}); medians of "
        f"{repeat} interleaved runs. CPU is user+sys of the whole process tree; peak PSS is summed over the "
        "tree, sampled every 50 ms in a separate run of each scenario.",
        "",
        "| scenario | wall s | CPU s | peak PSS MB | processes |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in "abcd":
        lines.append(
            f"| {labels[name]} | {median(name, 'wall_s'):.2f} | {median(name, 'cpu_s'):.2f} | "
            f"{median(name, 'peak_pss_mb'):.0f} | {max(m.peak_processes for m in runs[name])} |"
        )
    pss_ratio = median("d", "peak_pss_mb") / median("c", "peak_pss_mb")
    lines += [
        "",
        "| check | measured | target |",
        "|---|---:|---:|",
        f"| wall (a) / (b), median of per-pair ratios | {ratio:.2f} | <= 1.10 |",
        f"| peak PSS (a) | {median('a', 'peak_pss_mb'):.0f} MB | <= 650 MB |",
        f"| wall (c) | {median('c', 'wall_s'):.2f} s | <= 4 s |",
        f"| peak PSS (d) / (c) | {pss_ratio:.2f} | <= 1.2 |",
        "",
    ]
    write_results(RESULTS, lines)


if __name__ == "__main__":
    main()
