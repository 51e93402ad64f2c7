"""The client API's overhead: hello-pt-mlflow as a Trainer vs the same training as a script; writes
bench/results/client_api.md.

    python bench/client_api.py [--repeat 3]

The same work for all three (2 sites x 5,000 training images, 1 local epoch, 2 rounds, batch 4, lr 0.001,
validation on the 10,000 test images, every batch's losses logged to MLflow): jobs/hello-pt-mlflow (a Trainer),
jobs/hello-pt-mlflow-script in a thread of the site (the default), and as its own process. Runs alternate,
so that a noisy machine affects all alike; the ratios are medians of same-repeat ratios.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import sys

from measure import REPO, Measurement, fedstream, measure, start, write_results

OUT = REPO / "bench" / "out" / "client_api"
RESULTS = REPO / "bench" / "results" / "client_api.md"


LABELS = {"trainer": "Trainer (hello-pt-mlflow)", "thread": "script, mode thread", "process": "script, mode process"}


def commands(data: str) -> dict[str, list[str]]:
    """The command of each kind of site code, by its short name."""
    common = ["-n", "2", "-t", "2", "-q", "--set", "server.workflow.args.num_rounds=2"]
    trainer = [
        "client.trainer.args.epochs=1",
        "client.trainer.args.batch_size=4",
        "client.trainer.args.lr=0.001",
        f"client.trainer.args.data.root={data}",
        "client.trainer.args.data.max_train_samples=5000",
    ]
    args = ["--epochs", "1", "--batch-size", "4", "--lr", "0.001", "--data-root", data, "--max-train-samples",
            "5000", "--shard", "{index}", "--num-shards", "{num_sites}"]  # fmt: skip
    script_args = "[" + ", ".join(f'"{arg}"' for arg in args) + "]"
    sets = {
        "trainer": ("hello-pt-mlflow", trainer),
        "thread": ("hello-pt-mlflow-script", [f"client.script.args={script_args}", "client.script.mode=thread"]),
        "process": ("hello-pt-mlflow-script", [f"client.script.args={script_args}", "client.script.mode=process"]),
    }
    return {
        name: fedstream("simulate", str(REPO / "jobs" / job), "-w", str(OUT / f"ws-{name}"), *common)
        + [x for item in items for x in ("--set", item)]
        for name, (job, items) in sets.items()
    }


def main() -> None:
    repeat, data = start(__doc__, OUT)
    runs: dict[str, list[Measurement]] = {}
    for i in range(repeat):
        for name, command in commands(str(data)).items():
            shutil.rmtree(OUT / f"ws-{name}", ignore_errors=True)
            run = measure(command, memory=False, log=OUT / f"{name}-{i}.log")
            if run.returncode:
                sys.exit(f"{name} failed with exit code {run.returncode}; see {OUT}")
            runs.setdefault(name, []).append(run)
            print(f"{LABELS[name]} run {i + 1}: {run.wall_s:.2f} s wall, {run.cpu_s:.2f} s CPU", flush=True)
    base = runs["trainer"]
    lines = [
        "# Client API overhead",
        "",
        f"Command: `python bench/client_api.py --repeat {repeat}` on {platform.node() or 'this machine'} "
        f"(Python {platform.python_version()}); medians of {repeat} interleaved runs. The work: 2 sites x 5,000 "
        "training images, 1 epoch, 2 rounds, batch 4, lr 0.001, validation on the 10,000 test images, every "
        "batch's two losses logged to MLflow (the embedded store).",
        "",
        "| site code | wall s | CPU s | wall / Trainer (same repeat) |",
        "|---|---:|---:|---:|",
    ]
    for name, measured in runs.items():
        ratio = statistics.median(m.wall_s / b.wall_s for m, b in zip(measured, base, strict=True))
        wall = statistics.median(m.wall_s for m in measured)
        cpu = statistics.median(m.cpu_s for m in measured)
        lines.append(f"| {LABELS[name]} | {wall:.2f} | {cpu:.2f} | {ratio:.3f} |")
    lines += ["", "Target (issue 9): the script within 1.03 x the Trainer's wall time.", ""]
    write_results(RESULTS, lines)


if __name__ == "__main__":
    main()
