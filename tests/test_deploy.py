"""A real deployment on 127.0.0.1: a server and clients as separate processes over mutual TLS, with real
certificates. The same job runs unchanged and gives what the simulator gives; refusals are clear."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mlflow import MlflowClient
from mlflow.entities import Run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedstream.config import load_job
from fedstream.deploy import protocol
from fedstream.deploy.admin import Admin
from fedstream.deploy.archive import pack_job
from fedstream.deploy.kit import Kit, load_kit
from fedstream.deploy.poc import LocalFederation, federation, free_port, poc_project
from fedstream.deploy.provision import Authority, provision
from fedstream.deploy.server import ENDED
from fedstream.deploy.signing import sign_job
from fedstream.deploy.site_link import GrpcSiteLink
from fedstream.errors import ConfigError, FedstreamError, TransportError
from fedstream.messages import Result
from fedstream.pt.executor import job_sites
from fedstream.site.host import SiteHost
from fedstream.wire import decode, encode_parts
from tests.helpers import (
    PROC_STATUS,
    REPO,
    anonymous_mb,
    hello_job,
    read_result,
    run_cli,
    start_cli,
    turns_job,
    wait_for,
)
from tests.tcp_proxy import TcpProxy

TINY = [
    "--set",
    "server.workflow.args.num_rounds=2",
    "--set",
    "client.trainer.args.data.max_train_samples=48",
    "--set",
    "client.trainer.args.data.max_val_samples=32",
    "--set",
    "client.trainer.args.batch_size=16",
    "--set",
    "client.trainer.args.epochs=1",
]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _scalars(logdir: Path) -> dict[str, int]:
    counts = {}
    for folder in sorted(logdir.iterdir()):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        counts[folder.name] = sum(len(events.Scalars(tag)) for tag in events.Tags()["scalars"])
    return counts


def job_runs(client: MlflowClient, experiment_name: str, job_id: str) -> list[Run]:
    """The MLflow runs of job ``job_id`` in its experiment (read back with MLflow's client)."""
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], f"tags.`fedstream.job_id` = '{job_id}'"))


def _mlflow_counts(job_id: str) -> dict[str, int]:
    """Metric values per run of the job (read back with MLflow's client), by run name."""
    client = MlflowClient()
    runs = job_runs(client, "hello-pt-experiment", job_id)
    assert len(runs) == 3  # the server's run and one per site
    counts = {}
    for run in runs:
        assert run.info.status == "FINISHED"
        name = run.info.run_name if "mlflow.parentRunId" in run.data.tags else "parent"
        counts[name] = sum(len(client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics)
    return counts


def _outcome(result: dict[str, Any]) -> tuple[Any, ...]:
    weights = torch.load(result["models"]["global"])
    tracking = {name: result["tracking"][name]["written"] for name in ("mlflow", "tensorboard")}
    return (
        weights,
        tracking,
        _scalars(Path(result["tracking"]["tensorboard"]["logdir"])),
        _mlflow_counts(result["job_id"]),
    )


@pytest.mark.skipif(not PROC_STATUS.is_file(), reason="reads the process's memory in /proc")
def test_a_large_message_is_received_on_disk_not_in_memory(tmp_path: Path) -> None:
    """A server receives each site's result into a temporary file: the results of many sites sent at once,
    waiting to be averaged, do not add up in its memory."""
    weights = {"w": np.arange(16 * 2**20, dtype=np.float32)}  # 64 MiB
    pieces = list(protocol.chunks(*encode_parts(Result("1.train.site-1.1", "site-1", num_samples=3, weights=weights))))
    spool = tmp_path / "spool"
    spool.mkdir()
    before = anonymous_mb()
    frame = protocol.join_chunks(iter(pieces), 2**30, spool=spool)
    grown = anonymous_mb() - before
    del pieces
    message = decode(frame)
    assert isinstance(message, Result) and message.num_samples == 3
    assert np.array_equal(message.weights["w"], weights["w"])
    message.weights["w"][0] = -1  # writable, as a frame in memory is; the file is not changed
    assert grown < 16, f"receiving a 64 MiB message took {grown:.0f} MB of memory"
    assert list(spool.iterdir()) == []  # the file has no name: nothing is left behind
    with pytest.raises(protocol.TooLarge, match=r"over the limit of 8\.0 MiB"):
        protocol.join_chunks(protocol.chunks(*encode_parts(message)), 8 * 2**20, spool=spool)
    small = decode(protocol.join_chunks(iter([b"".join(protocol.chunks(*encode_parts(Result("t", "s"))))]), 2**20))
    assert isinstance(small, Result) and small.task_id == "t"


def test_poc_runs_the_job_unchanged_and_matches_simulate(tmp_path: Path, tiny_cifar: Path) -> None:
    job = str(REPO / "jobs" / "hello-pt-mlflow")
    data = ["--set", f"client.trainer.args.data.root={tiny_cifar}"]
    simulated = run_cli("simulate", job, "-w", str(tmp_path / "sim"), "-n", "2", "-t", "2", *data, *TINY)
    assert simulated.returncode == 0, simulated.stdout + simulated.stderr
    deployed = run_cli("poc", job, "-w", str(tmp_path / "poc"), "-n", "2", "--threads", "1", *data, *TINY)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "completed" in deployed.stdout and "accuracy" in deployed.stdout
    (workspace,) = (tmp_path / "poc" / "server" / "jobs").iterdir()
    result = read_result(workspace)
    assert result["status"] == "completed" and result["clients"] == ["site-1", "site-2"]
    assert result["submitter"] == "admin"
    sim_weights, *sim_counts = _outcome(read_result(tmp_path / "sim"))
    poc_weights, *poc_counts = _outcome(result)
    assert sim_weights.keys() == poc_weights.keys()
    for name in sim_weights:
        torch.testing.assert_close(poc_weights[name], sim_weights[name], rtol=0, atol=1e-6)
    assert poc_counts == sim_counts
    assert poc_counts[0]["mlflow"] > 0 and poc_counts[1]["site-1"] > 0
    for site in ("site-1", "site-2"):  # the site's own log stays on the site
        (site_log,) = (tmp_path / "poc" / site / "jobs").glob(f"*/{site}/log.txt")
        assert "training" in site_log.read_text()
    assert set(result["logs"]) == {"combined", "server"}, "no paths to site logs the server does not have"
    assert "each site's own log stays on the site" in deployed.stdout


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Any:
    workspace = tmp_path_factory.mktemp("deployment")
    with federation(workspace, 2) as local:
        yield workspace, local.admin


def test_poc_refuses_more_sites_than_fit_in_memory_before_starting_anything(tmp_path: Path) -> None:
    done = run_cli("poc", str(REPO / "jobs" / "hello-pt"), "-w", str(tmp_path / "ws"), "-n", "100000")
    assert done.returncode == 2, done.stderr
    assert "-n: 100000 sites need about 39,062 GB under poc" in done.stderr
    assert "fedstream simulate -n 100000 -t T" in " ".join(done.stderr.split())
    assert not (tmp_path / "ws").exists()


def test_bad_numbers_on_the_command_line_are_refused_before_anything_starts(tmp_path: Path) -> None:
    kits = tmp_path / "kits"
    for args, words in [
        (["server", "start", str(kits / "server"), "--absent-after", "-1"], "--absent-after: expected a positive"),
        (["server", "start", str(kits / "server"), "--absent-after", "nan"], "--absent-after: expected a positive"),
        (["server", "start", str(kits / "server"), "--max-message-mb", "0"], "--max-message-mb: expected a positive"),
        (["client", "start", str(kits / "site-1"), "--threads", "-1"], "--threads: expected a number of threads"),
        (["poc", str(REPO / "jobs" / "hello-pt"), "--threads", "-2"], "--threads: expected a number of threads"),
    ]:
        done = run_cli(*args, "-w", str(tmp_path / "ws"))
        assert done.returncode == 2 and words in done.stderr, done.stderr
    assert not (tmp_path / "ws").exists()


def test_poc_checks_the_job_folder_and_overrides_before_starting_anything(tmp_path: Path) -> None:
    for job, sets, words in [
        (tmp_path / "missing", [], "missing: no such job folder"),
        (REPO / "jobs" / "hello-pt", ["--set", "server.workflw.path=x"], "server.workflw: unknown key"),
    ]:
        done = run_cli("poc", str(job), "-w", str(tmp_path / "ws"), *sets)
        assert done.returncode == 2 and words in done.stderr, done.stderr
        assert not (tmp_path / "ws").exists(), "no kits, no processes"


def _processes_of(workspace: Path) -> list[str]:
    """The command lines of the running processes that name ``workspace``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(process.info["cmdline"] or [])
        if str(workspace) in line and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(line)
    return found


def test_no_process_outlives_poc(tmp_path: Path, tiny_cifar: Path) -> None:
    # hello-pt has no receivers: the job ends the moment its last round does, as the clients start the site
    # processes for their next job. One a client started as it was stopped ends at once, not after the
    # seconds it takes to load PyTorch.
    data = ["--set", f"client.trainer.args.data.root={tiny_cifar}"]
    done = run_cli("poc", str(REPO / "jobs" / "hello-pt"), "-w", str(tmp_path / "poc"), "-n", "2", "-q", *data, *TINY)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(lambda: not _processes_of(tmp_path / "poc"), "poc's processes to end", timeout_s=1)
    (line,) = done.stdout.splitlines()  # -q, as simulate's: the outcome alone
    assert line.startswith("completed: round 2 accuracy=") and line.endswith("result.json"), line


def test_ctrl_c_stops_poc_with_the_jobs_outcome_and_the_next_poc_does_not_resume_it(tmp_path: Path) -> None:
    # Ctrl-C in a terminal: SIGINT to poc's process group (poc, its server and its clients). poc said nothing
    # and the stopped server's job stayed "interrupted": the next poc in that workspace (new kits, a new CA)
    # resumed it first, and the sites refused it (or, with fewer sites, the server waited for the missing one).
    workspace = tmp_path / "poc"
    slow = turns_job(tmp_path / "slow", rounds=50, trainer_args="seconds = 0.2")
    poc = start_cli("poc", str(slow), "-w", str(workspace), "-n", "2", stdout=subprocess.PIPE, start_new_session=True)
    assert poc.stdout is not None
    wait_for(lambda: "running" in poc.stdout.readline(), "the job to run")  # type: ignore[union-attr]
    os.killpg(poc.pid, signal.SIGINT)
    with poc.stdout:
        said = " ".join(poc.stdout.read().split())
    assert poc.wait(60) == 130
    assert "interrupted (Ctrl-C)" in said and "result.json" in said and "Traceback" not in said, said
    wait_for(lambda: not _processes_of(workspace), "poc's processes to end", timeout_s=5)

    quick = turns_job(tmp_path / "quick", rounds=1)
    done = run_cli(
        "poc", str(quick), "-w", str(workspace), "-n", "1", "-q", "--set", "server.workflow.args.min_clients=1"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    said = (workspace / "server.out").read_text()
    assert "is not resumed: the job was signed with a certificate of another federation" in said
    assert said.count("starts on") == 2, "the slow job once, in the first poc; the quick one"


def test_a_killed_poc_stops_its_server_and_clients_and_the_job_keeps_its_tracking(
    tmp_path: Path, tracking_store: Path
) -> None:
    # kill -9 of poc (no clean-up of its own) left its server, clients and site processes running: the job went on
    # to its end, and the server and clients ran on after it, holding the workspace. They now get SIGTERM when poc
    # dies, the server several times (Linux sends it again as each of poc's threads ends): it stops the job once,
    # as on any SIGTERM, and its receivers still write every event the sites sent (MLflow holds them all for
    # 60 s here, so there are some to write).
    workspace = tmp_path / "poc"
    slow = turns_job(tmp_path / "slow", rounds=50, trainer_args="seconds = 0.2\nsteps = 10")
    mlflow = ["server.receivers.mlflow.path=fedstream.tracking.MLflowReceiver"]
    mlflow += ["server.receivers.mlflow.args.flush_interval_s=60"]
    sets = [arg for item in mlflow for arg in ("--set", item)]
    poc = start_cli("poc", str(slow), "-w", str(workspace), "-n", "2", *sets, stdout=subprocess.PIPE)
    assert poc.stdout is not None
    with poc.stdout:
        wait_for(lambda: "round 2/50 done" in poc.stdout.readline(), "round 2")  # type: ignore[union-attr]
        poc.kill()
        assert poc.wait(60) == -signal.SIGKILL
    wait_for(lambda: not _processes_of(workspace), "poc's server, clients and site processes to end", timeout_s=90)
    (result,) = (workspace / "server" / "jobs").glob("*/result.json")
    outcome = json.loads(result.read_text())
    assert outcome["error"] == "interrupted (SIGTERM)" and len(outcome["rounds"]) < 50, outcome
    written = outcome["tracking"]["mlflow"]
    assert written["received"] == written["written"] >= 40 and written["dropped"] == 0, written


def test_a_result_over_the_servers_size_limit_fails_its_task_saying_so(tmp_path: Path) -> None:
    # The server takes results of at most 0.5 MiB (--max-message-mb 0.5), and tells the sites as they join: a
    # site's 2 MiB result is answered with a failure naming the sizes (sent, it was refused and the site
    # stopped, and the job said only "the site stopped before it answered"). The limit is the results': each
    # site's 800 kB text, in a message of its events, is delivered.
    job = turns_job(tmp_path, trainer_args="text_kb = 800")
    sets = ["model.path=turns.Wide", "server.workflow.args.min_clients=1"]
    with federation(tmp_path / "ws", 2, max_message_mb=0.5) as local:
        status = local.admin.follow(local.admin.submit(job, sets, ["site-1", "site-2"]), lambda status: None)
    assert status["state"] == "failed"
    reason = "its result is 2.0 MiB, over the 0.5 MiB the server takes (fedstream server start --max-message-mb)"
    assert f"site-1: {reason}" in status["error"] and f"site-2: {reason}" in status["error"], status["error"]
    assert status["result"]["tracking"]["events"]["received"] == {"site-1": 1, "site-2": 1}


def test_a_site_certificate_cannot_manage_jobs(deployment: Any) -> None:
    workspace, admin = deployment
    impostor = Admin(load_kit(workspace / "kits" / "site-1", "site"))
    jobs = [job["id"] for job in admin.jobs()]
    with pytest.raises(FedstreamError, match="site-1 is a site, not an admin"):
        impostor.jobs()
    with pytest.raises(FedstreamError, match="not an admin"):
        impostor.submit(REPO / "jobs" / "hello-pt", [])
    assert [job["id"] for job in admin.jobs()] == jobs, "nothing was submitted"
    impostor.close()


def test_a_kit_of_another_federation_is_refused(deployment: Any, tmp_path: Path) -> None:
    _, admin = deployment
    provision(poc_project(1, 1), tmp_path / "other")
    stranger = Admin(load_kit(tmp_path / "other" / "admin", "admin"), admin.address)
    with pytest.raises(TransportError, match="do not trust each other"):
        stranger.jobs()
    stranger.close()


def test_bad_jobs_are_refused_at_submission_with_local_names(deployment: Any, tmp_path: Path) -> None:
    workspace, admin = deployment
    job = hello_job(tmp_path / "job", tmp_path)
    jobs = [job["id"] for job in admin.jobs()]
    with pytest.raises(ConfigError) as caught:
        admin.submit(job, ["server.workflow.args.min_clients=5"], ["site-1", "site-2"])
    assert str(caught.value).startswith(f"{job.resolve() / 'job.toml'} (--set): server.workflow.args.min_clients")
    with pytest.raises(ConfigError, match="bad site name"):
        admin.submit(job, [], ["../x"])
    with pytest.raises(ConfigError, match="not a job folder"):
        admin.submit(tmp_path, [])
    with pytest.raises(FedstreamError, match="no job 'nope'"):
        admin.abort("nope")
    assert [job["id"] for job in admin.jobs()] == jobs, "nothing was submitted"
    kept = list((workspace / "server" / "code").iterdir())
    assert all((folder / "job.json").is_file() for folder in kept), "the refused jobs' code is not kept"


def test_the_admin_sees_the_connected_sites(deployment: Any) -> None:
    _, admin = deployment
    wait_for(lambda: len(admin.sites()) == 2, "both clients to call the server")
    sites = admin.sites()
    assert [entry["site"] for entry in sites] == ["site-1", "site-2"]
    assert all(entry["version"] for entry in sites)


def test_connection_errors_say_what_to_do(deployment: Any) -> None:
    workspace, _ = deployment
    kit = load_kit(workspace / "kits" / "admin", "admin")
    for address, words in [("localhost:1", "refused the connection"), ("nohost.invalid:1", "cannot resolve")]:
        with pytest.raises(TransportError, match=words):
            Admin(kit, address).jobs()


def test_a_call_cut_by_the_server_stopping_says_so() -> None:
    # What a site's long poll gets when the server stops or restarts (gRPC's words: "Cancelling all calls").
    polling, released = threading.Event(), threading.Event()

    def poll(request: bytes, context: grpc.ServicerContext) -> Any:
        polling.set()
        released.wait(60)
        yield b""

    workers = ThreadPoolExecutor(2)
    server = grpc.server(workers)
    handlers = {"Poll": grpc.unary_stream_rpc_method_handler(poll)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Server", handlers),))
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    stopping = threading.Thread(target=lambda: polling.wait(60) and server.stop(grace=0.1).wait())
    stopping.start()
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        list(channel.unary_stream("/test.Server/Poll")(b"", timeout=60))
    released.set()
    stopping.join()
    workers.shutdown()
    assert protocol.explain(caught.value, address) == f"the server at {address} stopped (or is restarting)"


def test_a_server_that_cannot_listen_says_why(deployment: Any, tmp_path: Path) -> None:
    workspace, _ = deployment
    kit = str(workspace / "kits" / "server")
    in_use = load_kit(kit, "server").config.port  # the running server's
    for listen, words in [
        (f"127.0.0.1:{in_use}", f"port {in_use} is in use by another process"),
        ("192.0.2.1:9443", "192.0.2.1 is not an address of this machine"),  # TEST-NET-1: nobody's
        ("9443", "expected HOST:PORT"),
    ]:
        done = run_cli("server", "start", kit, "-w", str(tmp_path / "ws"), "--listen", listen, timeout=60)
        assert done.returncode == 1 and f"error: cannot listen on {listen}: {words}" in done.stderr, done.stderr


def test_connection_errors_through_a_proxy_name_the_proxy(deployment: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace, _ = deployment
    kit = load_kit(workspace / "kits" / "admin", "admin")
    for variable in ("https_proxy", "no_proxy"):  # the channel sets them from the upper-case ones: undone after
        monkeypatch.delenv(variable, raising=False)
    forbidding = TcpProxy()
    forbidding.answer = b"HTTP/1.1 403 Forbidden"
    for proxy, words in [
        (f"http://127.0.0.1:{free_port()}", r"proxy http://127.0.0.1:\d+ \(from https_proxy\) refused the connection"),
        ("nohost.invalid:3128", "cannot resolve the host name of the proxy http://nohost.invalid:3128"),  # no scheme
        (f"http://{forbidding.address}", f"would not connect to {kit.config.server} \\(HTTP 403\\)"),
    ]:
        monkeypatch.setenv("https_proxy", proxy)
        with pytest.raises(TransportError, match=words):
            Admin(kit).jobs()
    forbidding.close()
    monkeypatch.delenv("https_proxy")  # the upper-case names, which gRPC alone would not read, count too
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransportError, match=r"\(from HTTPS_PROXY\) refused the connection"):
        Admin(kit).jobs()
    monkeypatch.setenv("NO_PROXY", "example.org,localhost")
    Admin(kit).jobs()  # the server, reached without the proxy (which would have refused: nothing listens there)


def test_a_second_server_client_or_poc_on_a_folder_in_use_stops_at_once(deployment: Any) -> None:
    workspace, admin = deployment
    kits = workspace / "kits"
    port = str(free_port())
    second = {
        "the fedstream server server": ["server", "start", str(kits / "server"), "-w", str(workspace / "server")],
        "the fedstream client of site-1": ["client", "start", str(kits / "site-1"), "-w", str(workspace / "site-1")],
        "fedstream poc": ["poc", str(REPO / "jobs" / "hello-pt"), "-n", "2", "-w", str(workspace)],
    }
    second["the fedstream server server"] += ["--listen", f"127.0.0.1:{port}"]
    for holder, args in second.items():
        done = run_cli(*args, timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"in use by {holder} (pid " in done.stderr and "Traceback" not in done.stderr, done.stderr
    wait_for(lambda: [site["site"] for site in admin.sites()] == ["site-1", "site-2"], "the running ones to go on")


def test_jobs_and_sites_from_the_command_line(deployment: Any, tmp_path: Path) -> None:
    workspace, admin = deployment
    kit = ["--kit", str(workspace / "kits" / "admin")]
    job_id = admin.submit(turns_job(tmp_path, rounds=1), [], ["site-1", "site-2"])
    assert admin.follow(job_id, lambda status: None)["state"] == "completed"
    listed = run_cli("jobs", "list", *kit)  # a table, whole also when the output is not a terminal
    assert listed.returncode == 0, listed.stderr
    row = rf"^{job_id} +turns +completed +1/1 +\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d +admin +site-1, site-2$"
    assert re.search(row, listed.stdout, re.MULTILINE), listed.stdout
    status = run_cli("jobs", "status", job_id, *kit).stdout
    assert re.search(row, status, re.MULTILINE) and "\ncompleted: round 1 accuracy=1 " in status, status
    as_json = json.loads(run_cli("jobs", "list", "--json", *kit).stdout)
    assert job_id in [job["id"] for job in as_json]
    assert json.loads(run_cli("jobs", "status", job_id, "--json", *kit).stdout)["result"]["status"] == "completed"
    sites = run_cli("sites", *kit).stdout.splitlines()
    assert sites[0].split() == ["site", "version", "last", "call"]
    assert [line.split()[0] for line in sites[1:]] == ["site-1", "site-2"]
    assert [site["site"] for site in json.loads(run_cli("sites", "--json", *kit).stdout)] == ["site-1", "site-2"]
    missing = run_cli("jobs", "status", "missing", *kit)
    assert missing.returncode == 1 and "no job 'missing'" in missing.stderr


def test_a_job_for_a_site_never_seen_is_submitted_with_a_warning(deployment: Any, tmp_path: Path) -> None:
    workspace, admin = deployment
    kit = str(workspace / "kits" / "admin")
    done = run_cli("submit", str(turns_job(tmp_path)), "--kit", kit, "--sites", "site-1,site-9")
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())
    assert "warning: site-9 not connected to this server since it started" in said, said
    job_id = said.split()[2]
    admin.abort(job_id)
    status = admin.follow(job_id, lambda status: None)
    assert status["state"] == "aborted" and status["error"] == "aborted by admin"


def test_submit_follow_ends_with_the_summary_and_says_where_its_paths_are(deployment: Any, tmp_path: Path) -> None:
    workspace, _ = deployment
    kit = str(workspace / "kits" / "admin")
    done = run_cli("submit", str(turns_job(tmp_path, rounds=1)), "--kit", kit, "--follow")
    said = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = said.split()[2]
    assert "completed in" in said and f"result {workspace}/server/jobs/{job_id}/result.json" in said, said
    assert f"fetch them with: fedstream jobs download {job_id} --kit {kit} -o DIR" in said, said


def test_ctrl_c_while_following_leaves_the_job_running_and_says_so(deployment: Any, tmp_path: Path) -> None:
    workspace, admin = deployment
    kit = str(workspace / "kits" / "admin")
    job = turns_job(tmp_path, rounds=1, trainer_args="seconds = 60.0")
    follower = start_cli("submit", str(job), "--kit", kit, "--follow", stdout=subprocess.PIPE)
    assert follower.stdout is not None
    submitted = follower.stdout.readline()  # "submitted job ID"
    job_id = submitted.split()[2]
    wait_for(lambda: admin.status(job_id)["state"] == "running", "the job to run")
    follower.send_signal(signal.SIGINT)
    with follower.stdout:
        said = " ".join(follower.stdout.read().split())
    assert follower.wait(60) == 130
    assert f"stopped following; job {job_id} goes on on the server" in said and "Traceback" not in said, said
    assert admin.status(job_id)["state"] == "running"
    admin.abort(job_id)
    assert admin.follow(job_id, lambda status: None)["state"] == "aborted"


def test_a_job_aborted_while_the_server_loads_it_never_runs(deployment: Any, tmp_path: Path) -> None:
    # Its code takes 2 s to import, when the server checks it at submission and again when it starts it: the
    # abort comes while the job is out of the queue ("starting") and not running yet.
    _, admin = deployment
    job = turns_job(tmp_path, rounds=1)
    with open(job / "turns.py", "a") as code:
        code.write("\nimport time as _time\n\n_time.sleep(2)\n")
    job_id = admin.submit(job, [], ["site-1", "site-2"])
    wait_for(lambda: admin.status(job_id)["state"] == "starting", "the server to load the job")
    admin.abort(job_id)
    status = admin.follow(job_id, lambda status: None)
    assert status["state"] == "aborted" and status["error"] == "aborted by admin"
    assert status["result"]["rounds"] == []


def test_a_job_whose_code_does_not_return_when_imported_is_refused_and_holds_no_admin_up(tmp_path: Path) -> None:
    # Its module waits when imported (as one that trains or downloads at import would) until the test lets it go.
    hung, good = turns_job(tmp_path / "hung"), turns_job(tmp_path / "good")
    gate = tmp_path / "gate"
    with open(hung / "turns.py", "a") as code:
        code.write(f"\nimport pathlib as _p, time as _t\n\nwhile not _p.Path({str(gate)!r}).exists():\n")
        code.write("    _t.sleep(0.05)\n")
    with federation(tmp_path / "ws", 2, load_timeout_s=2) as local:
        with pytest.raises(FedstreamError, match=r"the job's code did not load within 2 s \(fedstream server start"):
            local.admin.submit(hung, [], ["site-1", "site-2"])
        with pytest.raises(FedstreamError, match="loading the code of job folder 'turns' from admin for over 2 s"):
            local.admin.submit(good, [], ["site-1", "site-2"])
        assert not list((tmp_path / "ws" / "server" / "code").iterdir()), "refused jobs leave no code behind"
        gate.touch()  # its code returns: the server loads jobs again
        job_id = local.admin.submit(good, [], ["site-1", "site-2"])
        assert local.admin.follow(job_id, lambda status: None)["state"] == "completed"
        assert len(local.admin.jobs()) == 1, "the refused ones were never queued"


def test_a_crashing_site_process_never_takes_its_client_down(deployment: Any, tmp_path: Path) -> None:
    # site-2's trainer kills its own process (SIGKILL) in round 1: the client starts a new one, which the server
    # sends the task again, and which dies the same way; the task fails, and site-2 trains again in round 2.
    _, admin = deployment
    job = turns_job(tmp_path, rounds=2, trainer_args='crash = ["site-2"]')
    # site-1 answers at once; the grace is long enough for any machine to start site-2's new process
    patient = ["server.workflow.args.min_clients=1", "server.workflow.args.wait_after_min_clients_s=300"]
    job_id = admin.submit(job, patient, ["site-1", "site-2"])
    status = admin.follow(job_id, lambda status: None)
    assert status["state"] == "completed", status
    first, second = status["result"]["rounds"]
    assert first["clients"] == ["site-1"]
    assert first["failed"] == [
        {
            "site": "site-2",
            "phase": "train",
            "reason": "the site's process restarted while running it, also when it was sent again",
        }
    ]
    assert second["clients"] == ["site-1", "site-2"]
    assert not any(status["result"]["tracking"]["events"]["duplicates"].values())


def test_a_client_killed_mid_round_and_restarted_loses_and_repeats_no_record(tmp_path: Path) -> None:
    # site-2's trainer logs steps 0-299 in round 1 and kills its client (SIGKILL) before they could be sent;
    # its process dies with the client. The restarted client's new site process sends them from disk, and
    # runs the interrupted task again: the round completes with both sites, as min_clients = 2 wants. The
    # second run logs steps 0-399: MLflow gets the first run's 300 steps once, and the second's last 100.
    job = turns_job(tmp_path, rounds=2, trainer_args='kill_client = ["site-2"]')
    sets = ["server.receivers.mlflow.path=fedstream.tracking.MLflowReceiver"]
    with federation(tmp_path / "ws", 2) as local:
        job_id = local.admin.submit(job, sets, ["site-1", "site-2"])
        wait_for(lambda: local.processes["site-2"].poll() is not None, "site-2's client to be killed")
        local.restart("site-2")
        status = local.admin.follow(job_id, lambda status: None)
    assert status["state"] == "completed", status
    assert [r["clients"] for r in status["result"]["rounds"]] == [["site-1", "site-2"]] * 2
    assert all(not r["failed"] for r in status["result"]["rounds"])
    client = MlflowClient()
    runs = job_runs(client, "turns", job_id)
    (site_2,) = [run for run in runs if run.info.run_name == "site-2"]
    history = client.get_metric_history(site_2.info.run_id, "progress")
    assert sorted((m.step, m.value) for m in history) == [(step, 1.0 if step < 300 else 2.0) for step in range(400)]
    assert status["result"]["tracking"]["events"]["repeats"] == {"site-1": 0, "site-2": 300}
    assert not list((tmp_path / "ws" / "site-2" / "jobs").glob("*/site-2/outbox.jsonl")), "delivered: removed"


def test_an_abort_ends_a_running_job(deployment: Any, tmp_path: Path) -> None:
    _, admin = deployment
    job = turns_job(tmp_path, rounds=50, trainer_args="seconds = 0.2")
    job_id = admin.submit(job, [], ["site-1", "site-2"])
    aborted: list[int] = []

    def abort_after_round_one(status: dict[str, Any]) -> None:
        if status["round"] >= 1 and not aborted:
            aborted.append(status["round"])
            admin.abort(job_id)

    status = admin.follow(job_id, abort_after_round_one)
    assert status["state"] == "aborted" and status["result"]["error"] == status["error"] == "aborted by admin"
    assert 1 <= len(status["result"]["rounds"]) < 50


def test_a_job_changed_after_signing_is_refused(deployment: Any, tmp_path: Path) -> None:
    workspace, _ = deployment
    kit = load_kit(workspace / "kits" / "admin", "admin")
    job = hello_job(tmp_path / "job", tmp_path)
    signed = sign_job(kit.key, kit.cert, pack_job(job), [])
    (job / "extra.py").write_text("import os\n")
    header = {"folder": "job", "overrides": [], "sites": ["site-1"], **vars(signed)}
    channel = protocol.channel(kit)
    submit = channel.stream_unary(protocol.method("Submit"))
    with pytest.raises(grpc.RpcError) as caught:
        submit(iter([protocol.to_json(header), *protocol.chunks(pack_job(job))]), timeout=60)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "modified after admin signed it" in caught.value.details()
    channel.close()


def test_sites_refuse_custom_code_or_bad_own_settings_and_say_so(tmp_path: Path) -> None:
    def adjust(kits: Path) -> None:
        edit(kits / "site-1" / "kit.toml", "overrides = []", 'overrides = ["client.trainer.args.seconds=\\"soon\\""]')
        edit(kits / "site-2" / "kit.toml", "allow_custom_code = true", "allow_custom_code = false")

    with federation(tmp_path / "ws", 2, adjust=adjust) as local:
        admin = local.admin
        job_id = admin.submit(turns_job(tmp_path), ["server.workflow.args.min_clients=1"], ["site-1", "site-2"])
        status = admin.follow(job_id, lambda status: None)
    assert status["state"] == "failed"
    error = status["result"]["error"]
    assert "site-2: the site declined the job: this site runs only components installed on it" in error
    assert "turns.py" in error
    assert "site-1/kit.toml: overrides: client.trainer.args.seconds: Input should be a valid number" in error


BIG = """
import torch


class Big(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2_500_000))  # 10 MB: five chunks each way
"""


def test_connections_cut_in_the_middle_of_model_transfers_cost_nothing(tmp_path: Path) -> None:
    # The first three connections to carry more than 3 MB are cut there, in the middle of a task or a
    # result; each is sent again, and every result counts once.
    proxy = TcpProxy(cut=lambda number, count: proxy.cuts < 3 and count > 3 * 2**20)
    job = turns_job(tmp_path)
    (job / "big.py").write_text(BIG)
    edit(job / "job.toml", '"turns.Square"', '"big.Big"')

    def adjust(kits: Path) -> None:
        port = load_kit(kits / "server", "server").config.port
        proxy.upstream = f"127.0.0.1:{port}"
        for site in ("site-1", "site-2"):
            edit(kits / site / "kit.toml", f'server = "localhost:{port}"', f'server = "{proxy.address}"')

    with federation(tmp_path / "ws", 2, adjust=adjust) as local:
        admin = local.admin
        job_id = admin.submit(job, ["server.workflow.args.num_rounds=2"], ["site-1", "site-2"])
        status = admin.follow(job_id, lambda status: None)
    proxy.close()
    assert proxy.cuts >= 3, "the test cut transfers"
    assert status["state"] == "completed", status["result"]["error"]
    for summary in status["result"]["rounds"]:
        assert summary["clients"] == ["site-1", "site-2"] and summary["failed"] == []
    assert status["result"]["membership"] == []
    # A model's transfer is logged by the end that received it, with its size and rate.
    server_log = (tmp_path / "ws" / "server" / "jobs" / job_id / "log.txt").read_text()
    site_log = (tmp_path / "ws" / "site-1" / "jobs" / job_id / "log.txt").read_text()
    came_in = r"came in: 9\.5 MiB in [\d.]+ s \([\d,]+ MiB/s\)"
    assert re.search(rf"site-1: the result of 2\.train\.site-1\.\d+ {came_in}", server_log), server_log
    assert re.search(rf"task 2\.validate\.site-1\.\d+ {came_in}", site_log), site_log


def test_sites_reach_the_server_through_an_https_proxy(tmp_path: Path) -> None:
    proxy = TcpProxy()  # a CONNECT proxy
    environment = {"https_proxy": f"http://{proxy.address}", "no_proxy": ""}
    with federation(tmp_path / "ws", 1, environment=environment) as local:
        admin = local.admin
        job_id = admin.submit(turns_job(tmp_path), ["server.workflow.args.min_clients=1"], ["site-1"])
        status = admin.follow(job_id, lambda status: None)
        server = admin.address
    proxy.close()
    assert status["state"] == "completed", status["result"]["error"]
    assert proxy.connect_targets and set(proxy.connect_targets) == {server}


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_restarted_server_resumes_its_job_after_the_last_completed_round(tmp_path: Path, how: signal.Signals) -> None:
    # Each task logs 10 steps, which wait on the server for a minute before they are written, as do the rounds'
    # global metrics: a killed server had acknowledged or completed them, so its journal gives them to the next
    # one's MLflow receiver. The round the restart interrupts is sent again, and a site that had done it
    # answers with its result: no step twice.
    job = turns_job(tmp_path, rounds=4, trainer_args="seconds = 0.5\nsteps = 10")
    receivers = ["server.receivers.mlflow.path=fedstream.tracking.MLflowReceiver"]
    receivers.append("server.receivers.mlflow.args.flush_interval_s=60")
    receivers.append("server.receivers.tensorboard.path=fedstream.tracking.TensorBoardReceiver")
    with federation(tmp_path / "ws", 2) as local:
        job_id = local.admin.submit(job, receivers, ["site-1", "site-2"])
        restarted: list[int] = []

        def restart_after_round_two(status: dict[str, Any]) -> None:
            if status["round"] >= 2 and not restarted:
                restarted.append(status["round"])
                local.restart("server", how)

        status = local.admin.follow(job_id, restart_after_round_two)
        local.restart("server")
        again = local.admin.follow(job_id, lambda status: None)  # waits for the server to be back
    assert (again["state"], again["round"], again["num_rounds"]) == ("completed", 4, 4), "known after a restart"
    result = status["result"]
    assert status["state"] == "completed", result["error"]
    assert result["resumed_after_round"] >= 2
    assert [r["round"] for r in result["rounds"]] == [1, 2, 3, 4]
    assert all(r["clients"] == ["site-1", "site-2"] for r in result["rounds"][result["resumed_after_round"] :])
    client = MlflowClient()
    runs = job_runs(client, "turns", job_id)
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert parent.info.status == "FINISHED" and parent.info.run_id == result["tracking"]["mlflow"]["parent_run_id"]
    steps = sorted(m.step for m in client.get_metric_history(parent.info.run_id, "accuracy"))
    assert steps == [1, 2, 3, 4], "each round's global metrics once, also those the killed server had not written"
    for site in ("site-1", "site-2"):
        (run,) = [run for run in runs if run.info.run_name == site]
        turns = sorted(m.step for m in client.get_metric_history(run.info.run_id, "turn"))
        assert turns == list(range(40)), f"{site}: every step once, also of the round the restart interrupted"
    logdir = Path(result["tracking"]["tensorboard"]["logdir"])
    for run, tag, expected in (
        ("site-1", "turn", range(40)),
        ("site-2", "turn", range(40)),
        ("server", "accuracy", range(1, 5)),
    ):
        events = EventAccumulator(str(logdir / run), size_guidance={"scalars": 0})
        events.Reload()
        assert sorted(e.step for e in events.Scalars(tag)) == list(expected), f"TensorBoard {run}: each step once"


def test_a_server_killed_in_the_first_round_starts_it_again_and_loses_or_repeats_nothing(tmp_path: Path) -> None:
    # Killed once the sites' first events are journaled, while they still train: no round is completed, so the
    # job starts again at round 1 in its folder, the journal's events are written, the sites answer round 1's
    # tasks (sent again under their ids) with the results they have.
    job = turns_job(tmp_path, rounds=2, trainer_args="seconds = 2.0\nsteps = 10")
    mlflow = ["server.receivers.mlflow.path=fedstream.tracking.MLflowReceiver"]
    mlflow.append("server.receivers.mlflow.args.flush_interval_s=60")
    with federation(tmp_path / "ws", 2) as local:
        job_id = local.admin.submit(job, mlflow, ["site-1", "site-2"])
        journal = tmp_path / "ws" / "server" / "jobs" / job_id / "server" / "events.jsonl"
        wait_for(lambda: journal.is_file() and journal.read_bytes().count(b'"site"') >= 2, "both sites' events")
        local.restart("server", signal.SIGKILL)
        status = local.admin.follow(job_id, lambda status: None)
    result = status["result"]
    assert status["state"] == "completed", result["error"]
    assert [r["round"] for r in result["rounds"]] == [1, 2] and "resumed_after_round" not in result
    client = MlflowClient()
    runs = job_runs(client, "turns", job_id)
    for site in ("site-1", "site-2"):
        (run,) = [run for run in runs if run.info.run_name == site]
        turns = sorted(m.step for m in client.get_metric_history(run.info.run_id, "turn"))
        assert turns == list(range(20)), f"{site}: every step once"
    assert not journal.exists(), "the job ended: its journal is removed"


def test_a_server_and_a_site_killed_together_mid_task_log_no_step_twice(tmp_path: Path) -> None:
    # site-2 logs steps 0-299 in round 1 and waits; once the server has them, the server and site-2's client
    # are killed (SIGKILL) and started again. The new server sends round 1's task again under its id, and
    # site-2's new process runs it again, logging steps 0-399: the new server knows from its journal what the
    # first run logged, so MLflow gets the first run's 300 steps once, and the second's last 100.
    job = turns_job(tmp_path, rounds=1, trainer_args='hold = ["site-2"]')
    sets = ["server.receivers.mlflow.path=fedstream.tracking.MLflowReceiver"]
    with federation(tmp_path / "ws", 2) as local:
        job_id = local.admin.submit(job, sets, ["site-1", "site-2"])
        journal = tmp_path / "ws" / "server" / "jobs" / job_id / "server" / "events.jsonl"
        wait_for(lambda: journal.is_file() and b'"step":299' in journal.read_bytes(), "the first run's steps")
        local.restart("server", signal.SIGKILL)
        local.restart("site-2", signal.SIGKILL)
        status = local.admin.follow(job_id, lambda status: None)
    assert status["state"] == "completed", status["result"]["error"]
    client = MlflowClient()
    runs = job_runs(client, "turns", job_id)
    (site_2,) = [run for run in runs if run.info.run_name == "site-2"]
    history = client.get_metric_history(site_2.info.run_id, "progress")
    assert sorted((m.step, m.value) for m in history) == [(step, 1.0 if step < 300 else 2.0) for step in range(400)]
    assert status["result"]["tracking"]["events"]["repeats"]["site-2"] == 300


def test_an_admin_reads_the_log_and_downloads_the_outputs(deployment: Any, tmp_path: Path) -> None:
    workspace, admin = deployment
    job_id = admin.submit(turns_job(tmp_path), [], ["site-1", "site-2"])
    assert admin.follow(job_id, lambda status: None)["state"] == "completed"
    assert "round 1/1 done" in admin.logs(job_id)
    done = run_cli("jobs", "download", job_id, "-o", str(tmp_path / "got"), "--kit", str(workspace / "kits" / "admin"))
    assert done.returncode == 0, done.stderr
    result = read_result(tmp_path / "got" / job_id)
    assert result["job_id"] == job_id and result["status"] == "completed"
    assert (tmp_path / "got" / job_id / "server" / "models" / "global.pt").is_file()
    with pytest.raises(FedstreamError, match="no job 'nope'"):
        admin.download("nope", tmp_path)
    (tmp_path / "a-file").touch()
    with pytest.raises(ConfigError, match=f"a-file/{job_id}: cannot create the folder: Not a directory"):
        admin.download(job_id, tmp_path / "a-file")


def test_a_changed_job_runs_its_new_code_on_a_long_running_server(deployment: Any, tmp_path: Path) -> None:
    _, admin = deployment
    job = turns_job(tmp_path)
    first = admin.submit(job, [], ["site-1", "site-2"])
    assert admin.follow(first, lambda status: None)["state"] == "completed"
    edit(job / "turns.py", "torch.zeros(2, 2)", "torch.zeros(3, 3)")  # the same module name, a new model
    second = admin.submit(job, [], ["site-1", "site-2"])
    status = admin.follow(second, lambda status: None)
    assert status["state"] == "completed", status["result"]["error"]
    assert torch.load(status["result"]["models"]["global"])["w"].shape == (3, 3)


def test_an_expired_certificate_is_refused_with_a_hint(deployment: Any, tmp_path: Path) -> None:
    workspace, admin = deployment
    authority = Authority.load(workspace / "kits" / "ca")
    kit = load_kit(workspace / "kits" / "admin", "admin")
    key = serialization.load_pem_private_key(kit.key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    cert = x509.load_pem_x509_certificate(kit.cert)
    expired = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(authority.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past)
        .not_valid_after(past + datetime.timedelta(days=1))
        .sign(authority.key, hashes.SHA256())
    )
    stale = Kit(kit.folder, kit.config, expired.public_bytes(serialization.Encoding.PEM), kit.key, kit.ca)
    with pytest.raises(TransportError, match="did not accept this kit's certificate"):
        Admin(stale, admin.address).jobs()


def test_a_server_serves_more_sites_than_a_small_thread_pool_would(tmp_path: Path) -> None:
    """Every connected site holds a long poll (60 s here). With 80 sites, the round must not wait for polls to
    time out before the sites' results get a thread (it did with a pool of 64 threads)."""
    count = 80
    project = poc_project(count, free_port())
    kits = tmp_path / "kits"
    provision(project, kits)
    command = [sys.executable, "-m", "fedstream", "server", "start", str(kits / "server")]
    command += ["-w", str(tmp_path / "server"), "--listen", f"127.0.0.1:{project.server.port}"]
    job_dir = turns_job(tmp_path)  # idle sites
    overrides = ["server.workflow.args.num_rounds=2", f"server.workflow.args.min_clients={count}"]
    local = LocalFederation(tmp_path, {"server": command}, {})
    try:
        local.admin.wait_ready(60)
        sites = [f"site-{i}" for i in range(1, count + 1)]
        job_id = local.admin.submit(job_dir, overrides, sites)
        job = load_job(job_dir, overrides)
        indices = {site: i for i, site in enumerate(sites)}

        def serve(site: str) -> None:
            link = GrpcSiteLink(load_kit(kits / site, "site"), job_id, poll_s=60)
            SiteHost(link, [site], job_sites(job, job_id, indices, count, tmp_path / "sites", link.send_events)).serve()

        for site in sites:
            threading.Thread(target=serve, args=(site,), daemon=True).start()
        wait_for(lambda: local.admin.status(job_id)["state"] in ENDED, "the job to end", timeout_s=50)
        assert local.admin.status(job_id)["state"] == "completed"
    finally:
        local.stop()
