"""``fedstream``: run a job in the simulator, or show a job's fully resolved config.

Exit codes: 0 completed; 1 the job failed; 2 bad command line or config; 3 completed but tracking lost or
refused records; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

from fedstream.config import load_job
from fedstream.errors import ConfigError, FedstreamError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedstream", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulate", help="run a job with all its sites on this machine")
    sim.add_argument("job", help="job folder (holds job.toml)")
    sim.add_argument("-w", "--workspace", required=True, help="folder for logs, models and result.json")
    who = sim.add_mutually_exclusive_group()
    who.add_argument("-n", "--clients", type=int, help="number of clients, named site-1..site-N (default 2)")
    who.add_argument("-c", "--client-names", help="comma-separated client names")
    sim.add_argument(
        "-t", "--threads", type=int, default=None, help="clients training at once (default: all, at most 2)"
    )
    sim.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job config value by its dotted key, e.g. server.workflow.args.num_rounds=5",
    )
    loud = sim.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="print only the outcome")
    loud.add_argument("-v", "--verbose", action="store_true", help="print log records instead of the live progress")

    job = commands.add_parser("job", help="inspect a job")
    job_commands = job.add_subparsers(dest="job_command", required=True)
    show = job_commands.add_parser("show", help="print the fully resolved config, defaults included")
    show.add_argument("job", help="job folder (holds job.toml)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def _simulate(args: argparse.Namespace, console: Console) -> int:
    from fedstream.cli.progress import LiveProgress, print_summary
    from fedstream.simulator.simulate import simulate, site_names

    job = load_job(args.job, args.overrides)
    names = args.client_names.split(",") if args.client_names is not None else None
    sites = site_names(args.clients if args.clients is not None else (None if names else 2), names)
    threads = args.threads if args.threads is not None else min(len(sites), 2)
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    handler = RichHandler(console=console, show_path=False, level=level)
    if args.verbose or args.quiet:
        result = simulate(job, args.workspace, sites, threads, console=handler, verbose=args.verbose)
    else:
        progress = LiveProgress(console)
        with progress:
            result = simulate(job, args.workspace, sites, threads, observe=progress.observe, console=handler)
    if args.quiet:
        data = result.data
        outcome = f"{data['status']}: {result.workspace.result}" + (f" ({data['error']})" if data["error"] else "")
        console.print(outcome, soft_wrap=True, markup=False, highlight=False)
    else:
        print_summary(console, result.data)
    return result.exit_code


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        if args.command == "simulate":
            return _simulate(args, console)
        print(load_job(args.job, args.overrides).to_toml(), end="")
        return 0
    except FedstreamError as exc:
        Console(stderr=True).print(f"error: {exc}", style="red", soft_wrap=True, markup=False, highlight=False)
        return EXIT_USAGE if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
