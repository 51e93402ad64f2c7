"""This checkout against an earlier commit, in the same run; writes bench/results/versus.md.

    python bench/versus.py REV [--repeat 3]

The earlier commit is checked out in ``bench/out/versus-REV`` (a git worktree) and run from its own
sources (``PYTHONPATH``) with this checkout's environment. The two alternate, scenario by scenario, so that a
noisy machine affects both alike:

(a) hello-pt, 2 sites x 5,000 images, 2 rounds, batch 4: wall time;
(c) a near-zero job (1 round, 64 images per site): wall time;
(d) 100 sites on 2 workers, 64 images each: peak PSS of the process tree;
(t) 2 sites x 100,000 ``log_metric`` into MLflow (a new SQLite store) and TensorBoard: metrics per second
    from the first call to ``result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from measure import HELLO_A, REPO, TINY, cifar_root, measure, write_results

OUT = REPO / "bench" / "out"
RESULTS = REPO / "bench" / "results" / "versus.md"


def simulate(tree: Path, job: str, ws: Path, sites: int, *sets: str) -> list[str]:
    command = [sys.executable, "-m", "fedstream", "simulate", str(tree / job), "-w", str(ws)]
    command += ["-n", str(sites), "-t", "2", "-q"]
    for item in sets:
        command += ["--set", item]
    return command


def run(tree: Path, name: str, data: Path, tag: str) -> float:
    """One scenario with the sources of ``tree``; returns its measure."""
    ws = OUT / f"versus-ws-{tag}-{name}"
    shutil.rmtree(ws, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    root = f"client.trainer.args.data.root={data}"
    if name == "t":
        store = Path(f"{ws}.mlflow.db")
        store.unlink(missing_ok=True)
        command = simulate(
            tree, "bench/jobs/burst", ws, 2, f"server.receivers.mlflow.args.tracking_uri=sqlite:///{store}"
        )
    elif name == "a":
        command = simulate(tree, "jobs/hello-pt", ws, 2, root, *HELLO_A)
    else:
        command = simulate(
            tree, "jobs/hello-pt", ws, 2 if name == "c" else 100, root, *TINY, "server.workflow.args.min_clients=2"
        )
    measured = measure(command, memory=name == "d", log=OUT / f"versus-{tag}-{name}.log", env=env)
    if measured.returncode:
        sys.exit(f"({name}) of {tag} failed ({measured.returncode}); see {OUT / f'versus-{tag}-{name}.log'}")
    if name == "t":
        began = min(json.loads((ws / s / "log_metric_cost.json").read_text())["began"] for s in ("site-1", "site-2"))
        return 200_000 / ((ws / "result.json").stat().st_mtime - began)
    return measured.peak_pss_mb if name == "d" else measured.wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the earlier commit")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{OUT / 'mlflow.db'}"
    rev = subprocess.run(["git", "rev-parse", "--short", args.rev], capture_output=True, text=True, check=True)
    short = rev.stdout.strip()
    old = OUT / f"versus-{short}"
    if not old.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(old), short], cwd=REPO, check=True)
    data = cifar_root(OUT)
    names = {"a": "(a) hello-pt wall s", "c": "(c) near-zero job wall s", "d": "(d) 100 sites peak PSS MB",
             "t": "(t) tracking end to end metrics/s"}  # fmt: skip
    values: dict[str, dict[str, list[float]]] = {name: {"new": [], "old": []} for name in names}
    for i in range(args.repeat):
        for name in names:
            for tag, tree in (("old", old), ("new", REPO)) if i % 2 else (("new", REPO), ("old", old)):
                values[name][tag].append(run(tree, name, data, tag))
            print(
                f"run {i + 1} ({name}): new {values[name]['new'][-1]:.2f}, old {values[name]['old'][-1]:.2f}",
                flush=True,
            )
    lines = [
        f"# This checkout against {short}",
        "",
        f"Command: `python bench/versus.py {short} --repeat {args.repeat}` on {platform.node() or 'this machine'} "
        f"({platform.machine()}, Python {platform.python_version()}); medians of {args.repeat} runs of each, "
        "alternating. Better is lower for wall time and memory, higher for metrics/s.",
        "",
        "| scenario | this checkout | earlier | ratio (this / earlier) |",
        "|---|---:|---:|---:|",
    ]
    for name, label in names.items():
        new, old_value = statistics.median(values[name]["new"]), statistics.median(values[name]["old"])
        lines.append(f"| {label} | {new:,.2f} | {old_value:,.2f} | {new / old_value:.2f} |")
    write_results(RESULTS, [*lines, ""])


if __name__ == "__main__":
    main()
