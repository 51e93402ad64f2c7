"""The ``fedstream`` command: run a job in the simulator, or show a job's fully resolved config.

Heavy modules (PyTorch, pydantic, rich) are imported by the command that needs them, so that ``--help``
answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from fedstream import __version__
from fedstream.cli import deploy
from fedstream.errors import ConfigError, FedstreamError

if TYPE_CHECKING:
    from rich.console import Console

EXIT_USAGE = 2

EXIT_CODES = """\
exit codes:
  0    the job completed
  1    the job failed (the reason names the round, the sites and their causes)
  2    bad command line or job config
  3    the job completed, but tracking lost or refused records (see result.json)
  130  interrupted (Ctrl-C or SIGTERM)
"""

SIMULATE_EXAMPLE = (
    """\
example:
  fedstream simulate jobs/hello-pt-mlflow -w /tmp/fs -n 2 -t 2 --set server.workflow.args.num_rounds=3

"""
    + EXIT_CODES
)


OVERRIDES: dict[str, Any] = {
    "dest": "overrides",
    "action": "append",
    "default": [],
    "metavar": "KEY=VALUE",
    "help": "override a job config value by its dotted key, e.g. server.workflow.args.num_rounds=5 "
    "(the value is read as TOML; plain text is taken as a string)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstream",
        description="Federated learning with experiment tracking streamed from every site to the server.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedstream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser(
        "simulate",
        help="run a job with all its sites on this machine",
        description="Run a job with the server in this process and its sites in worker processes.",
        epilog=SIMULATE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("job", help="job folder (holds job.toml)")
    sim.add_argument("-w", "--workspace", required=True, help="folder for logs, models and result.json")
    who = sim.add_mutually_exclusive_group()
    who.add_argument(
        "-n",
        "--sites",
        "--clients",
        dest="num_sites",
        type=int,
        help="number of sites, named site-1..site-N (default 2)",
    )
    who.add_argument(
        "-c", "--site-names", "--client-names", dest="site_names", help="comma-separated site names, e.g. alice,bob"
    )
    sim.add_argument(
        "-t",
        "--threads",
        type=int,
        default=None,
        help="how many sites train at the same time, each in its own worker process (default: the number of "
        "sites, at most 2); the other sites wait for their turn",
    )
    sim.add_argument("--set", **OVERRIDES)
    loud = sim.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="print only the outcome, in one line")
    loud.add_argument("-v", "--verbose", action="store_true", help="print log records instead of the live progress")

    job = commands.add_parser("job", help="inspect a job")
    job_commands = job.add_subparsers(dest="job_command", required=True, metavar="COMMAND")
    show = job_commands.add_parser(
        "show",
        help="print the fully resolved config, defaults included",
        description="Print the job's config with every default written out; the output is itself a job.toml.",
    )
    show.add_argument("job", help="job folder (holds job.toml)")
    show.add_argument("--set", **OVERRIDES)
    new = commands.add_parser(
        "new",
        help="write a new job folder from a template",
        description="Write a job folder, ready for `fedstream simulate`, from a template shipped with fedstream.",
        epilog="templates: hello-pt, hello-pt-mlflow (default), hello-pt-tb-mlflow, hello-pt-mlflow-script, "
        "cifar10-hetero",
    )
    new.add_argument("folder", help="the job folder to create (must not exist, or be empty)")
    new.add_argument("--template", default="hello-pt-mlflow", help="the template (default: hello-pt-mlflow)")
    deploy.add_parsers(commands, OVERRIDES)
    return parser


def _new(args: argparse.Namespace, console: Console) -> int:
    from fedstream.cli.new import new_job

    folder = new_job(args.folder, args.template)
    files = ", ".join(sorted(path.name for path in folder.iterdir()))
    console.print(f"wrote {folder} ({files})", highlight=False, soft_wrap=True)
    console.print(
        f"run it:  fedstream simulate {folder} -w {folder}-workspace -n 2 -t 2", highlight=False, soft_wrap=True
    )
    return 0


def _simulate(args: argparse.Namespace, console: Console) -> int:
    from rich.logging import RichHandler

    from fedstream.cli.progress import LiveProgress, print_outcome, print_summary
    from fedstream.config import load_job
    from fedstream.simulator.simulate import simulate, site_names

    job = load_job(args.job, args.overrides)
    names = args.site_names.split(",") if args.site_names is not None else None
    sites = site_names(args.num_sites if args.num_sites is not None else (None if names else 2), names)
    threads = args.threads if args.threads is not None else min(len(sites), 2)
    level = logging.INFO if args.verbose else logging.CRITICAL if args.quiet else logging.WARNING
    handler = RichHandler(console=console, show_path=False, level=level)
    if args.verbose or args.quiet:
        result = simulate(job, args.workspace, sites, threads, console=handler, verbose=args.verbose)
    else:
        progress = LiveProgress(console)
        with progress:
            result = simulate(job, args.workspace, sites, threads, observe=progress.observe, console=handler)
    if args.quiet:
        print_outcome(console, result.data)
    else:
        print_summary(console, result.data)
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    from rich.console import Console

    console = Console(stderr=False)
    try:
        if args.command == "simulate":
            return _simulate(args, console)
        if args.command == "new":
            return _new(args, console)
        if args.command != "job":
            return deploy.run(args, console)
        from fedstream.config import load_job

        print(load_job(args.job, args.overrides).to_toml(), end="")
        return 0
    except FedstreamError as exc:
        Console(stderr=True).print(f"error: {exc}", style="red", soft_wrap=True, markup=False, highlight=False)
        return EXIT_USAGE if isinstance(exc, ConfigError) else 1
    except OSError as exc:  # a full or read-only disk, a file that vanished: one line, not a traceback
        Console(stderr=True).print(f"error: {exc}", style="red", soft_wrap=True, markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> NoReturn:
    """The ``fedstream`` command: :func:`main`, then an exit that skips the interpreter's teardown. Everything is
    written, closed and stopped by then, and tearing down PyTorch's modules alone takes about a second (a
    second that every ``simulate``, ``poc``, server and client stop would wait)."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a closed pipe or a full disk was reported by main() already
            stream.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
