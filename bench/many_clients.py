"""Many clients on one deployed server: round time and server memory per site; writes
bench/results/many_clients.md.

    python bench/many_clients.py [--clients 200] [--hosts 4] [--size-mib 1]

A real `fedstream server start` (provisioned kits, mutual TLS on 127.0.0.1) runs two rounds of bench/jobs/big
(a model of --size-mib MiB; the trainer returns it unchanged) with 2 sites, then with --clients sites, in the
same run. Round 1 includes the sites connecting (their processes start when the job is submitted); round 2 is
a round of connected sites. Each site is a real client connection: its own certificate and key, its own gRPC
channel, the pull protocol and the site runtime (SiteHost, TrainerExecutor). What is light is where the sites
live: --hosts processes host them as threads, instead of one `fedstream client start` (and its PyTorch
process) per site, which this 2-core, 24 GB machine could not hold 200 of. So the numbers are the server's:
its peak RSS (sampled every 20 ms) and the round's duration from its result.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from measure import REPO, write_results

from fedstream.deploy.poc import LocalFederation, free_port, poc_project
from fedstream.deploy.provision import provision

OUT = REPO / "bench" / "out" / "many_clients"
RESULTS = REPO / "bench" / "results" / "many_clients.md"
JOB = REPO / "bench" / "jobs" / "big"


def host(kits: Path, sites: list[str], job_id: str, num_sites: int, workspace: Path) -> None:
    """A host process: each of ``sites`` as a thread with its own kit, link and site runtime."""
    from fedstream.config import load_job
    from fedstream.deploy.kit import load_kit
    from fedstream.deploy.site_link import GrpcSiteLink
    from fedstream.pt.executor import job_sites
    from fedstream.site.host import SiteHost

    logging.basicConfig(level=logging.WARNING)
    job = load_job(JOB, [f"model.args.size_mib={ARGS.size_mib}"])
    indices = {f"site-{i}": i - 1 for i in range(1, num_sites + 1)}

    def serve(site: str) -> None:
        link = GrpcSiteLink(load_kit(kits / site, "site"), job_id)
        SiteHost(link, [site], job_sites(job, job_id, indices, num_sites, workspace, link.send_events)).serve()

    threads = [threading.Thread(target=serve, args=(site,)) for site in sites]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def one_round(local: LocalFederation, kits: Path, count: int, hosts: int) -> dict[str, float]:
    sites = [f"site-{i}" for i in range(1, count + 1)]
    overrides = [
        f"model.args.size_mib={ARGS.size_mib}",
        f"server.workflow.args.min_clients={count}",
        "server.workflow.args.num_rounds=2",
    ]
    job_id = local.admin.submit(JOB, overrides, sites)
    server = psutil.Process(local.processes["server"].pid)
    idle = server.memory_info().rss
    groups = [sites[i::hosts] for i in range(min(hosts, count))]
    began = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--host",
                ",".join(group),
                "--job",
                job_id,
                "--clients",
                str(count),
                "--size-mib",
                str(ARGS.size_mib),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(OUT / f"host-{count}-{i}.log", "w"),  # noqa: SIM115 - closed with the process
        )
        for i, group in enumerate(groups)
    ]
    peak = idle
    while local.admin.status(job_id)["state"] in ("queued", "running"):
        peak = max(peak, server.memory_info().rss)
        time.sleep(0.02)
    wall = time.perf_counter() - began
    for process in processes:
        process.wait(120)
    result = json.loads((OUT / "server" / "jobs" / job_id / "result.json").read_text())
    if result["status"] != "completed":
        sys.exit(f"{count} sites: {result['error']}")
    first, second = (entry["duration_s"] for entry in result["rounds"])
    return {"first_s": first, "round_s": second, "wall_s": wall, "idle_mb": idle / 2**20, "peak_mb": peak / 2**20}


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{OUT / 'mlflow.db'}"
    project = poc_project(ARGS.clients, free_port())
    kits = OUT / "kits"
    provision(project, kits)
    command = [sys.executable, "-m", "fedstream", "server", "start", str(kits / "server"), "-w", str(OUT / "server")]
    command += ["--listen", f"127.0.0.1:{project.server.port}"]
    local = LocalFederation(OUT, {"server": command}, {})
    try:
        local.admin.wait_ready(60)
        few = one_round(local, kits, 2, ARGS.hosts)
        many = one_round(local, kits, ARGS.clients, ARGS.hosts)
    finally:
        local.stop()
    per_site = (many["peak_mb"] - few["peak_mb"]) / (ARGS.clients - 2)
    lines = [
        "# Many clients on one server",
        "",
        f"Command: `python bench/many_clients.py --clients {ARGS.clients} --hosts {ARGS.hosts} --size-mib "
        f"{ARGS.size_mib}` on {platform.node() or 'this machine'} ({os.cpu_count()} cores, Python "
        f"{platform.python_version()}), {time.strftime('%Y-%m-%d')}. Two rounds of a {ARGS.size_mib} MiB model "
        "(down to every site, back from every site, then validation), each site a real mutual-TLS client "
        f"connection, hosted as threads of {ARGS.hosts} processes; 2 sites measured in the same run as the baseline.",
        "",
        "| sites | round 1 s (connecting) | round 2 s | submit to done s | server RSS idle MB | server RSS peak MB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for count, row in ((2, few), (ARGS.clients, many)):
        lines.append(
            f"| {count} | {row['first_s']:.2f} | {row['round_s']:.2f} | {row['wall_s']:.2f} | {row['idle_mb']:.0f} "
            f"| {row['peak_mb']:.0f} |"
        )
    lines += [
        "",
        f"Server memory per site: {per_site:.2f} MB ((peak with {ARGS.clients} - peak with 2) / {ARGS.clients - 2}); "
        f"the model is {ARGS.size_mib} MiB. Round 2 per site: {many['round_s'] / ARGS.clients * 1000:.0f} ms.",
        "",
    ]
    write_results(RESULTS, lines)


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--clients", type=int, default=200)
parser.add_argument("--hosts", type=int, default=4)
parser.add_argument("--size-mib", type=int, default=1)
parser.add_argument("--host", default="", help=argparse.SUPPRESS)
parser.add_argument("--job", default="", help=argparse.SUPPRESS)
ARGS = parser.parse_args()

if __name__ == "__main__":
    if ARGS.host:
        host(OUT / "kits", ARGS.host.split(","), ARGS.job, ARGS.clients, OUT / "hosts")
    else:
        main()
