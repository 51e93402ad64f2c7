"""FedAvg, FedProx, FedOpt and SCAFFOLD on the heterogeneous CIFAR-10 job; writes bench/results/algorithms.md.

    python bench/algorithms.py [--rounds 10] [--epochs 1] [--per-site 1562] [--alpha 0.1] [--sites 8]

Every algorithm runs the same job (jobs/cifar10-hetero: ConvNet, augmentation, cosine schedule, Dirichlet
label skew) with the same seed and budget; only ``server.workflow`` changes. The default budget fits a 2-core
machine: 10 rounds of 1 local epoch on a quarter of the training set (1,562 images per site at most), with
validation on the whole test set (each site validates its Dirichlet share of it, so the weighted mean is the
accuracy on all 10,000 test images). All runs go to one MLflow experiment (bench/out/mlflow.db).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time

from measure import REPO, cifar_root, fedstream, write_results

OUT = REPO / "bench" / "out" / "algorithms"
RESULTS = REPO / "bench" / "results" / "algorithms.md"

ALGORITHMS = {
    "FedAvg": ["server.workflow.path=fedstream.workflows.FedAvg"],
    "FedProx (mu 0.01)": ["server.workflow.path=fedstream.workflows.FedProx", "server.workflow.args.mu=0.01"],
    "FedOpt (SGD, server momentum 0.9)": ["server.workflow.path=fedstream.workflows.FedOpt"],
    "FedOpt (Adam, server lr 0.01)": [
        "server.workflow.path=fedstream.workflows.FedOpt",
        "server.workflow.args.optimizer=adam",
        "server.workflow.args.server_lr=0.01",
    ],
    "SCAFFOLD": ["server.workflow.path=fedstream.workflows.Scaffold"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--per-site", type=int, default=1562, help="training images per site at most (0: all)")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    data = cifar_root(OUT.parent)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{OUT / 'mlflow.db'}"
    common = [
        f"client.trainer.args.data.root={data}",
        f"client.trainer.args.data.alpha={args.alpha}",
        f"client.trainer.args.data.max_train_samples={args.per_site}",
        f"client.trainer.args.epochs={args.epochs}",
        f"server.workflow.args.num_rounds={args.rounds}",
        f"server.workflow.args.min_clients={args.sites}",
    ]
    rows = []
    for name, sets in ALGORITHMS.items():
        ws = OUT / "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
        shutil.rmtree(ws, ignore_errors=True)
        command = fedstream("simulate", str(REPO / "jobs" / "cifar10-hetero"), "-w", str(ws), "-n", str(args.sites))
        command += ["-t", str(args.threads), "-q"]
        for item in common + sets:
            command += ["--set", item]
        began = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - began
        print(name, done.stdout.strip() or done.stderr.strip()[-500:], flush=True)
        result = json.loads((ws / "result.json").read_text())
        accuracy = [entry["metrics"]["accuracy"] for entry in result["rounds"]]
        rows.append((name, accuracy, wall, result["status"]))
    lines = [
        "# Algorithms on heterogeneous CIFAR-10",
        "",
        f"`python bench/algorithms.py --rounds {args.rounds} --epochs {args.epochs} --per-site {args.per_site} "
        f"--alpha {args.alpha} --sites {args.sites}` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} cores, Python {platform.python_version()}), {time.strftime('%Y-%m-%d')}.",
        "",
        f"Job: jobs/cifar10-hetero (ConvNet, random crops and flips, cosine learning rate from 0.03, weight decay "
        f"5e-4, batch 32), {args.sites} sites, Dirichlet label skew alpha {args.alpha}, {args.rounds} rounds of "
        f"{args.epochs} local epoch(s) on at most {args.per_site} training images per site, seed 0. Accuracy is "
        "the global model's on the whole test set (the sites' shares, weighted by their sizes).",
        "",
        "| algorithm | final accuracy | best accuracy | wall time | accuracy per round |",
        "|---|---|---|---|---|",
    ]
    for name, accuracy, wall, status in rows:
        if status != "completed" or not accuracy:
            lines.append(f"| {name} | {status} | | {wall:.0f} s | |")
            continue
        per_round = " ".join(f"{value:.3f}" for value in accuracy)
        lines.append(f"| {name} | {accuracy[-1]:.4f} | {max(accuracy):.4f} | {wall:.0f} s | {per_round} |")
    lines.append("")
    write_results(RESULTS, lines)


if __name__ == "__main__":
    main()
