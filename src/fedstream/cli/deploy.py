"""The deployment commands: provision, csr, sign, server, client, submit, jobs, sites, poc."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

DEPLOY_EXAMPLE = """\
example (one machine; see README "Deploying" for several):
  fedstream provision project.toml -o kits
  fedstream server start kits/server -w /srv/fedstream &
  fedstream client start kits/site-1 -w /var/fedstream &
  fedstream submit jobs/hello-pt-mlflow --kit kits/admin --follow
"""


def add_parsers(commands: Any, overrides: dict[str, Any]) -> None:
    """Add the deployment commands to the ``fedstream`` parser's subcommands."""
    prov = commands.add_parser(
        "provision",
        help="issue a federation's CA and startup kits",
        description="Create a CA and a startup kit per participant named in project.toml; running it again "
        "adds the kits of new participants and leaves existing ones alone.",
        epilog=DEPLOY_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prov.add_argument("project", help="project.toml: name, [server] hosts and port, sites, admins")
    prov.add_argument("-o", "--output", required=True, help="folder for ca/ and the kits")

    csr = commands.add_parser("csr", help="make a private key and a certificate signing request (on a site)")
    csr.add_argument("name", help="the participant's name (its certificate's common name)")
    csr.add_argument("-o", "--output", required=True, help="the kit folder to make; the key stays in it")
    sign = commands.add_parser("sign", help="sign a participant's request with the CA (where the CA is)")
    sign.add_argument("request", help="the .csr file")
    sign.add_argument("project", help="the federation's project.toml")
    sign.add_argument("-o", "--output", required=True, help="the folder that holds ca/ (the kits folder)")
    sign.add_argument("--role", choices=["site", "admin"], default="site")

    server = commands.add_parser("server", help="run the federation's server")
    server_commands = server.add_subparsers(dest="server_command", required=True, metavar="COMMAND")
    start = server_commands.add_parser("start", help="listen for sites and admins and run submitted jobs")
    start.add_argument("kit", help="the server's startup kit")
    start.add_argument("-w", "--workspace", required=True, help="folder for the jobs' outputs")
    start.add_argument("--listen", default="", help="address to listen on (default 0.0.0.0:<the kit's port>)")
    start.add_argument(
        "--absent-after",
        type=_positive("seconds"),
        default=30.0,
        help="seconds of silence after which a site is absent",
    )
    start.add_argument(
        "--max-message-mb",
        type=_positive("MiB"),
        help="the largest result a site may send (its weights and all), in MiB (default: 4096)",
    )
    start.add_argument(
        "--load-timeout",
        type=_positive("seconds"),
        default=120.0,
        help="seconds a submitted job's code may take to load (what its modules run when imported)",
    )

    client = commands.add_parser("client", help="run a site's client")
    client_commands = client.add_subparsers(dest="client_command", required=True, metavar="COMMAND")
    cstart = client_commands.add_parser("start", help="connect to the server and run the site's part of jobs")
    cstart.add_argument("kit", help="the site's startup kit")
    cstart.add_argument("-w", "--workspace", required=True, help="folder for the jobs' code and logs")
    cstart.add_argument("--threads", type=_threads, default=0, help="PyTorch threads for training (default: all cores)")

    submit = commands.add_parser("submit", help="submit a job to the server (admins)")
    submit.add_argument("job", help="job folder (holds job.toml)")
    submit.add_argument("--kit", required=True, help="an admin's startup kit")
    submit.add_argument("--sites", default="", help="comma-separated sites (default: the connected ones)")
    submit.add_argument("--follow", action="store_true", help="show its progress and wait for its end")
    submit.add_argument("--set", **overrides)

    jobs = commands.add_parser("jobs", help="list, inspect, abort or download jobs on the server (admins)")
    jobs.add_argument("action", choices=["list", "status", "logs", "abort", "download"])
    jobs.add_argument("job_id", nargs="?", default="")
    jobs.add_argument("--kit", required=True, help="an admin's startup kit")
    jobs.add_argument("-o", "--output", default=".", help="download: the folder to put <job id>/ in (default .)")
    jobs.add_argument("--json", action="store_true", help="list, status: print JSON (status: with the result)")

    sites = commands.add_parser("sites", help="the sites the server has seen (admins)")
    sites.add_argument("--kit", required=True, help="an admin's startup kit")
    sites.add_argument("--json", action="store_true", help="print JSON")

    poc = commands.add_parser(
        "poc",
        help="run a job on a real deployment on this machine",
        description="Provision a federation, start its server and one client per site as separate processes "
        "on 127.0.0.1 over mutual TLS, run the job, and stop them all.",
    )
    poc.add_argument("job", help="job folder (holds job.toml)")
    poc.add_argument("-w", "--workspace", required=True, help="folder for kits, the server's and sites' outputs")
    poc.add_argument("-n", "--sites", dest="num_sites", type=int, default=2, help="number of sites (default 2)")
    poc.add_argument("--threads", type=_threads, default=0, help="PyTorch threads per site (default: cores / sites)")
    poc.add_argument("--set", **overrides)
    poc.add_argument("-q", "--quiet", action="store_true", help="print only the outcome, in one line")


def _positive(unit: str) -> Callable[[str], float]:
    """An argparse type: a positive, finite number of ``unit``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected a positive number of {unit}, got {text!r}")
        return value

    return parse


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of threads (0: the default), got {text!r}")
    return value


def run(args: argparse.Namespace, console: Console) -> int:
    """Run a deployment command; returns the exit code."""
    if args.command != "server":  # gRPC's own log lines (a failed handshake) are for the server's log only
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from fedstream.deploy.kit import load_kit
    from fedstream.errors import ConfigError

    command = args.command
    if command == "provision":
        from fedstream.deploy.provision import load_project, provision

        with _in_project(args.project):
            created = provision(load_project(args.project), args.output)
        console.print(f"created {len(created)} kit(s) in {args.output}: {', '.join(created) or 'none new'}")
        return 0
    if command == "csr":
        from fedstream.deploy.provision import make_request

        path = make_request(args.name, args.output)
        console.print(f"send {path} to the federation's admin; the key stays in {args.output}")
        return 0
    if command == "sign":
        from fedstream.deploy.provision import load_project, sign_request

        with _in_project(args.project):
            folder = sign_request(args.request, args.output, args.role, load_project(args.project))
        console.print(f"signed: send the files of {folder} back (the requester adds its key.pem)")
        return 0
    if command in ("server", "client"):
        from fedstream.children import end_with_parent

        end_with_parent(signal.SIGTERM)  # started by poc: it stops with poc, even a poc killed with kill -9
    if command == "server":
        from fedstream.deploy.server import FederationServer, ServerSettings

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handler.setLevel(logging.INFO)
        settings = ServerSettings(absent_after_s=args.absent_after, load_timeout_s=args.load_timeout)
        if args.max_message_mb is not None:
            settings = dataclasses.replace(settings, max_message_bytes=int(args.max_message_mb * 2**20))
        kit = load_kit(args.kit, "server")
        return FederationServer(
            kit, Path(args.workspace), listen=args.listen, settings=settings, console=handler
        ).serve()
    if command == "client":
        from fedstream.deploy.client import Client

        return Client(load_kit(args.kit, "site"), Path(args.workspace), threads=args.threads).serve()
    if command == "poc":
        from fedstream.deploy.poc import run_poc

        show = (lambda status: None) if args.quiet else _shower(console)
        status = run_poc(args.job, args.workspace, args.num_sites, args.overrides, show, threads=args.threads)
        return _ended(console, status, quiet=args.quiet)

    from fedstream.deploy.admin import Admin

    admin = Admin(load_kit(args.kit, "admin"))
    try:
        if command == "submit":
            sites = [s.strip() for s in args.sites.split(",") if s.strip()] or None
            job_id = admin.submit(args.job, args.overrides, sites)
            console.print(f"submitted job {job_id}")
            unseen = sorted(set(sites or []) - {str(site["site"]) for site in admin.sites()})
            if unseen:
                console.print(
                    f"[yellow]warning:[/] {', '.join(unseen)} not connected to this server since it started; the "
                    "job waits for them as long as the server's --absent-after allows (30 s by default)"
                )
            if not args.follow:
                return 0
            try:
                status = admin.follow(job_id, _shower(console))
            except KeyboardInterrupt:
                console.print(
                    f"stopped following; job {job_id} goes on on the server (fedstream jobs status|abort {job_id} "
                    f"--kit {args.kit})",
                    soft_wrap=True,
                    markup=False,
                    highlight=False,
                )
                return 130
            code = _ended(console, status)
            console.print(
                f"(the paths are the server's; fetch them with: fedstream jobs download {job_id} --kit {args.kit} "
                "-o DIR)",
                soft_wrap=True,
                markup=False,
                highlight=False,
            )
            return code
        if command == "sites":
            sites = admin.sites()
            if args.json:
                _print_json(sites)
            else:
                _print_sites(console, sites)
            return 0
        if args.action != "list" and not args.job_id:
            raise ConfigError(f"name the job: fedstream jobs {args.action} JOB_ID --kit KIT", key="JOB_ID")
        if args.action in ("list", "status"):
            listed = admin.jobs() if args.action == "list" else admin.status(args.job_id)
            if args.json:
                _print_json(listed)
            else:
                _print_jobs(console, listed if isinstance(listed, list) else [listed])
        elif args.action == "logs":
            print(admin.logs(args.job_id), end="")
        elif args.action == "download":
            console.print(f"downloaded to {admin.download(args.job_id, args.output)}")
        else:
            admin.abort(args.job_id)
            console.print(f"job {args.job_id} is being aborted")
        return 0
    finally:
        admin.close()


@contextlib.contextmanager
def _in_project(path: str) -> Iterator[None]:
    """Place the errors that name a key of the project but no file in ``path``, the project's file."""
    from fedstream.errors import ConfigError

    try:
        yield
    except ConfigError as exc:
        if exc.key and not exc.file:
            raise exc.located(file=path) from None
        raise


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _print_jobs(console: Console, jobs: list[dict[str, Any]]) -> None:
    """The jobs as a table, with why each failed job failed (or, for a job's status, its outcome)."""
    import datetime

    from rich.text import Text

    from fedstream.cli.progress import print_outcome

    if not jobs:
        console.print("no jobs on this server")
        return
    table = _table("job", "name", "state", "rounds", "submitted", "by", "sites")
    for job in jobs:
        submitted = datetime.datetime.fromtimestamp(job["submitted"]).strftime("%Y-%m-%d %H:%M:%S")
        rounds = f"{job['round']}/{job['num_rounds']}" if job["num_rounds"] else ""
        row = (job["id"], job["name"], job["state"], rounds, submitted, job["submitter"], ", ".join(job["sites"]))
        table.add_row(*(Text(str(cell)) for cell in row))
    _print_table(console, table)
    for job in jobs:  # a job's status has its result: its outcome in one line; a list says why jobs failed
        if job.get("result"):
            print_outcome(console, job["result"])
        elif job.get("error"):
            console.print(Text(f"{job['id']} {job['state']}: {job['error']}", style="red"))


def _print_sites(console: Console, sites: list[dict[str, Any]]) -> None:
    """The sites as a table: name, fedstream version, when each last called."""
    from rich.text import Text

    if not sites:
        console.print("no site has called this server since it started")
        return
    table = _table("site", "version", "last call")
    for site in sites:
        table.add_row(Text(site["site"]), Text(site["version"]), f"{site['last_seen_s']:.0f} s ago")
    _print_table(console, table)


def _table(*columns: str) -> Table:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for number, column in enumerate(columns):  # a narrow terminal folds a cell, never cuts it short
        table.add_column(column, overflow="fold", no_wrap=number == 0)  # the first (a job's id) stays whole
    return table


def _print_table(console: Console, table: Table) -> None:
    """``table`` at its full width when the output is not a terminal (a file or a pipe has no width)."""
    from rich.console import Console
    from rich.measure import Measurement

    if not console.is_terminal:
        width = Measurement.get(console, console.options.update(max_width=10_000), table).maximum
        console = Console(file=console.file, width=max(width, console.width))
    console.print(table)


def _shower(console: Console) -> Any:
    def show(status: dict[str, Any]) -> None:
        rounds = f", round {status['round']}/{status['num_rounds']} done" if status["round"] else ""
        console.print(f"job {status['id']}: {status['state']}{rounds}")

    return show


def _ended(console: Console, status: dict[str, Any], *, quiet: bool = False) -> int:
    from fedstream.cli.progress import print_outcome, print_summary

    if status["result"] is not None:
        (print_outcome if quiet else print_summary)(console, status["result"])
    elif status.get("error"):
        console.print(f"job {status['id']} {status['state']}: {status['error']}", style="red", markup=False)
    return int(status["exit_code"]) if status["exit_code"] is not None else 1
