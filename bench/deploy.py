"""Benchmark of a deployment against the simulator on this machine; writes bench/results/deploy.md.

    python bench/deploy.py [--repeat 3]

(a) hello-pt, 2 sites x 5,000 images, 2 rounds, batch 4: ``fedstream poc`` (a server and 2 clients as
    processes over mutual TLS, provisioning included) against ``fedstream simulate -t 2``, alternating;
(c) a near-zero job (1 round, 64 images per site), the same way: poc's whole command, start to end;
(g) a 1 GiB model server -> site -> server -> site (train, then validate), one site under poc: the second
    round's time (the first also waits for the site's process to start) against a raw Python TLS socket
    moving the same 3 GiB over loopback in the same run; the same round's three transfers alone (from each
    message's first chunk to its last, as the receiving end logs them); and the server process's peak RSS
    against the model's size; and the server's peak RSS when 4 sites send a 64 MiB model at once (the results must not
    add up in the server's memory while they wait to be averaged); and what new memory costs on this machine
    (1 GiB written after 10 s idle, and again at once), which averaging a large model needs.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from measure import HELLO_A, REPO, TINY, fedstream, measure, start, write_results

OUT = REPO / "bench" / "out"
RESULTS = REPO / "bench" / "results" / "deploy.md"
SIZE_MIB = 1024
MANY_SITES, MANY_MIB = 4, 64


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def run(kind: str, scenario: str, data: Path) -> float:
    ws = OUT / f"deploy-{kind}-{scenario}"
    shutil.rmtree(ws, ignore_errors=True)
    sets = _sets(f"client.trainer.args.data.root={data}", *(HELLO_A if scenario == "a" else TINY))
    job = str(REPO / "jobs" / "hello-pt")
    if kind == "poc":
        command = fedstream("poc", job, "-w", str(ws), "-n", "2", *sets)
    else:
        command = fedstream("simulate", job, "-w", str(ws), "-n", "2", "-t", "2", "-q", *sets)
    measured = measure(command, log=OUT / f"deploy-{kind}-{scenario}.log")
    if measured.returncode:
        sys.exit(f"({scenario}) under {kind} failed; see {OUT / f'deploy-{kind}-{scenario}.log'}")
    return measured.wall_s


def raw_tls_s(total: int) -> float:
    """Seconds to move ``total`` bytes through a TLS socket over loopback (a throwaway self-signed pair)."""
    from fedstream.deploy.poc import poc_project
    from fedstream.deploy.provision import provision

    kits = Path(tempfile.mkdtemp(dir=OUT))
    provision(poc_project(1, 1), kits)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(kits / "server" / "cert.pem", kits / "server" / "key.pem")
    client_ctx = ssl.create_default_context(cafile=kits / "ca" / "ca.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = [0]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            while received[0] < total and (data := tls.recv(1 << 20)):
                received[0] += len(data)

    reader = threading.Thread(target=serve)
    reader.start()
    chunk = b"\0" * (2 << 20)
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        began = time.perf_counter()
        for _ in range(total // len(chunk)):
            tls.sendall(chunk)
        reader.join()
        elapsed = time.perf_counter() - began
    listener.close()
    shutil.rmtree(kits)
    return elapsed


def new_memory_s() -> tuple[float, float]:
    """Seconds to write 1 GiB of newly allocated memory: after 10 s idle (a virtual machine may have given the
    pages it was freed back to its host, which hands them out again more slowly), and again at once."""
    import numpy as np

    times = []
    for idle_s in (10, 0):
        time.sleep(idle_s)
        began = time.perf_counter()
        np.ones(2**30 // 8)
        times.append(time.perf_counter() - began)
    return times[0], times[1]


@dataclass(frozen=True)
class Transfer:
    """The big job's second round (the first also waits for the sites' processes to start), the time its
    transfers took (:func:`transfers_s`), and the server's memory in MB: its peak and its value once the job
    ended, resident in all (RSS) and anonymous (RSS without the file pages it maps: the results waiting in their
    files, which the kernel can drop and read again)."""

    round_s: float
    transfers_s: float
    peak_mb: float
    end_mb: float
    peak_anonymous_mb: float
    end_anonymous_mb: float


def transfer(sites: int, size_mib: int) -> Transfer:
    """The big job under poc with ``sites`` sites and a model of ``size_mib``."""
    ws = OUT / "deploy-big"
    shutil.rmtree(ws, ignore_errors=True)
    command = fedstream("poc", str(REPO / "bench" / "jobs" / "big"), "-w", str(ws), "-n", str(sites))
    command += _sets(f"model.args.size_mib={size_mib}", "server.workflow.args.num_rounds=2")
    command += _sets(f"server.workflow.args.min_clients={sites}")
    with open(OUT / "deploy-big.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        peak = last = peak_anonymous = last_anonymous = 0.0
        while process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                try:
                    if "server" in child.cmdline() and "start" in child.cmdline():
                        memory = child.memory_info()
                        last, last_anonymous = memory.rss / 2**20, (memory.rss - memory.shared) / 2**20
                        peak, peak_anonymous = max(peak, last), max(peak_anonymous, last_anonymous)
                except psutil.Error:
                    pass
            time.sleep(0.05)
    if process.returncode:
        sys.exit(f"(g) failed; see {OUT / 'deploy-big.log'}")
    (result,) = (ws / "server" / "jobs").glob("*/result.json")
    round_s = json.loads(result.read_text())["rounds"][1]["duration_s"]
    return Transfer(round_s, transfers_s(ws, 2), peak, last, peak_anonymous, last_anonymous)


def transfers_s(ws: Path, round: int) -> float:
    """The seconds the models of ``round`` took to move, from each one's first chunk to its last, as the
    receiving ends log them: the tasks in the sites' logs, the results in the server's."""
    logs = [*(ws / "server" / "jobs").glob("*/log.txt"), *ws.glob("site-*/jobs/*/log.txt")]
    timed = re.compile(rf" (?:task|the result of) {round}\.\S+ came in: [\d,.]+ MiB in ([\d.]+) s")
    return sum(float(found[1]) for log in logs for found in timed.finditer(log.read_text()))


def main() -> None:
    repeat, data = start(__doc__, OUT)
    walls: dict[str, dict[str, list[float]]] = {s: {"poc": [], "simulate": []} for s in ("a", "c")}
    big: list[Transfer] = []
    many: list[Transfer] = []
    raws: list[float] = []
    memory: list[tuple[float, float]] = []
    for i in range(repeat):
        for scenario in ("a", "c"):
            for kind in ("poc", "simulate") if i % 2 == 0 else ("simulate", "poc"):
                walls[scenario][kind].append(run(kind, scenario, data))
            print(f"run {i + 1} ({scenario}): poc {walls[scenario]['poc'][-1]:.2f} s, simulate "
                  f"{walls[scenario]['simulate'][-1]:.2f} s", flush=True)  # fmt: skip
        big.append(transfer(1, SIZE_MIB))
        raws.append(raw_tls_s(3 * SIZE_MIB * 2**20))
        many.append(transfer(MANY_SITES, MANY_MIB))
        memory.append(new_memory_s())
        print(f"run {i + 1} (g): round {big[-1].round_s:.2f} s, transfers {big[-1].transfers_s:.2f} s, raw TLS "
              f"{raws[-1]:.2f} s, server peak RSS {big[-1].peak_mb:.0f} MB; {MANY_SITES} sites: "
              f"{many[-1].peak_mb:.0f} MB; 1 GiB of new memory {memory[-1][0]:.2f} s (reused: {memory[-1][1]:.2f} s)",
              flush=True)  # fmt: skip
    med = {s: {k: statistics.median(v) for k, v in kinds.items()} for s, kinds in walls.items()}
    ratios_a = [p / s for p, s in zip(walls["a"]["poc"], walls["a"]["simulate"], strict=True)]
    moved = 3 * SIZE_MIB
    round_s, raw_s = statistics.median(t.round_s for t in big), statistics.median(raws)
    moving_s = statistics.median(t.transfers_s for t in big)
    peak = statistics.median(t.peak_mb for t in big)

    def models(runs: list[Transfer], size_mib: int) -> str:
        """The peak over the end, in models: resident in all, and anonymous."""
        rss = statistics.median((t.peak_mb - t.end_mb) / size_mib for t in runs)
        anonymous = statistics.median((t.peak_anonymous_mb - t.end_anonymous_mb) / size_mib for t in runs)
        return f"{rss:.1f} x the model (anonymous memory: {anonymous:.1f} x)"

    lines = [
        "# Deployment benchmark",
        "",
        f"Command: `python bench/deploy.py --repeat {repeat}` on {platform.node() or 'this machine'} "
        f"({platform.machine()}, Python {platform.python_version()}); medians of {repeat} runs, poc and simulate "
        "alternating.",
        "",
        "| measure | value | target |",
        "|---|---:|---:|",
        f"| (a) hello-pt, poc / simulate wall (median of per-pair ratios) | {statistics.median(ratios_a):.2f} "
        f"({med['a']['poc']:.1f} s / {med['a']['simulate']:.1f} s) | <= 1.05 |",
        f"| (c) near-zero job under poc, provisioning, server, 2 clients and TLS included | {med['c']['poc']:.1f} s "
        f"(simulate: {med['c']['simulate']:.1f} s) | <= 6 s |",
        f"| (g) {moved} MiB of weights through the deployment (one round: down, up, down) | {round_s:.1f} s, "
        f"{moved / round_s:.0f} MiB/s | |",
        f"| (g) a raw Python TLS socket moving the same bytes | {raw_s:.1f} s, {moved / raw_s:.0f} MiB/s | |",
        f"| (g) deployment / raw TLS throughput | {raw_s / round_s:.2f} | >= 0.5 |",
        f"| (g) the round's three transfers alone | {moving_s:.1f} s, {moved / moving_s:.0f} MiB/s, "
        f"{raw_s / moving_s:.2f} x raw TLS | |",
        f"| (g) server peak RSS with a {SIZE_MIB} MiB model | {peak:.0f} MB; over the server's RSS once the job "
        f"ended: {models(big, SIZE_MIB)} | <= model + 64 MB |",
        f"| (g) the same with {MANY_SITES} sites sending a {MANY_MIB} MiB model at once | {models(many, MANY_MIB)} | |",
        f"| this machine: 1 GiB of new memory written, after 10 s idle / at once | "
        f"{statistics.median(m[0] for m in memory):.2f} s / {statistics.median(m[1] for m in memory):.2f} s | |",
        "",
        "The (g) round also includes the averaging and the site loading the weights into its model twice (saving "
        "global.pt overlaps the validation task's transfer); the transfers alone are timed by the receiving ends "
        "from each model's first chunk to its last, written to the receiver's disk. The server's own (anonymous) "
        "memory holds the round's model while it averages, then the new model (the round's model is let go "
        "first); the average's float64 sums live in a temporary file. Results are received into temporary files "
        "and mapped: the pages of the one being averaged count in the RSS, not in the anonymous memory, and the "
        "kernel can "
        f"drop them; results waiting for their turn cost no memory, so {MANY_SITES} sites sending at once cost "
        "the server what one does. Averaging a model of N GiB writes 2 N GiB of sums and N GiB of new model: "
        "the last line is what new memory costs on this machine.",
        "",
    ]
    write_results(RESULTS, lines)


if __name__ == "__main__":
    main()
