"""What the terminal shows: live progress per round and per site, then a summary of the run."""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedstream.events import ROUND_STARTED, TASK_DONE, TASK_STARTED, TASKS_SENT, Event, EventBus
from fedstream.server.federation import Reply, TasksSent, TaskStarted
from fedstream.workflows.base import RoundStarted

_BAR = 24


def _bar(done: int, total: int) -> str:
    filled = round(_BAR * done / total) if total else 0
    return "━" * filled + "╺" + "─" * (_BAR - filled - 1) if filled < _BAR else "━" * _BAR


class LiveProgress:
    """A live view: the current round, each task's sites done / running / failed, and running sites' times.

    The view (and its refresh thread) starts with the first round, after the simulator has forked its workers.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.round = 0
        self.num_rounds = 0
        self.began = time.monotonic()
        self.phases: dict[str, dict[str, Any]] = {}
        self.running: dict[str, tuple[str, float]] = {}
        self.failures: list[str] = []
        self.live = Live(console=console, refresh_per_second=4, transient=True, get_renderable=self._render)

    def observe(self, bus: EventBus) -> None:
        bus.subscribe(ROUND_STARTED, self._round_started)
        bus.subscribe(TASKS_SENT, self._tasks_sent)
        bus.subscribe(TASK_STARTED, self._task_started)
        bus.subscribe(TASK_DONE, self._task_done)

    def __enter__(self) -> LiveProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live.is_started:
            self.live.stop()

    def _round_started(self, event: Event) -> None:
        if not self.live.is_started:
            self.live.start()
        data: RoundStarted = event.data
        self.round, self.num_rounds = data.round, data.num_rounds
        self.phases = {}

    def _tasks_sent(self, event: Event) -> None:
        data: TasksSent = event.data
        self.phases[data.task] = {"total": len(data.sites), "done": 0, "failed": 0}

    def _task_started(self, event: Event) -> None:
        data: TaskStarted = event.data
        self.running[data.site] = (data.task, time.monotonic())

    def _task_done(self, event: Event) -> None:
        reply: Reply = event.data
        self.running.pop(reply.site, None)
        phase = self.phases.setdefault(reply.task, {"total": 0, "done": 0, "failed": 0})
        phase["done"] += 1
        if not reply.ok:
            phase["failed"] += 1
            self.failures.append(f"round {reply.round} {reply.task} at {reply.site}: {reply.error}")

    def _render(self) -> Group:
        now = time.monotonic()
        lines = [
            Text.assemble(
                ("fedstream ", "bold"),
                f"round {self.round}/{self.num_rounds or '?'}  ",
                (f"{now - self.began:.0f} s", "dim"),
            )
        ]
        for name, phase in self.phases.items():
            done, total = phase["done"], phase["total"]
            failed = f", [red]{phase['failed']} failed[/]" if phase["failed"] else ""
            lines.append(Text.from_markup(f"  {name:<9}[cyan]{_bar(done, total)}[/] {done}/{total} sites{failed}"))
        for site, (task, since) in sorted(self.running.items())[:8]:
            lines.append(Text(f"    {site}: {task}ing… {now - since:.1f} s", style="dim"))
        if len(self.running) > 8:
            lines.append(Text(f"    … and {len(self.running) - 8} more", style="dim"))
        for failure in self.failures[-3:]:
            lines.append(Text(f"  ✗ {failure}", style="red"))
        return Group(*lines)


def print_summary(console: Console, result: dict[str, Any]) -> None:
    """The rounds table, where the outputs are, and how to look at the tracking data."""
    rounds = result["rounds"]
    if rounds:
        keys = sorted({key for r in rounds for key in r["metrics"]}, key=lambda k: (k != "accuracy", k != "loss", k))
        table = Table(title=f"{result['job']} ({result['job_id']})", title_justify="left")
        table.add_column("round", justify="right")
        for key in keys:
            table.add_column(key, justify="right")
        table.add_column("duration", justify="right")
        table.add_column("clients", justify="right")
        for r in rounds:
            metrics = [f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys]
            left_out = f" ({len(r['failed'])} left out)" if r["failed"] else ""
            table.add_row(str(r["round"]), *metrics, f"{r['duration_s']:.1f} s", f"{len(r['clients'])}{left_out}")
        console.print(table)
    ws = result["logs"]["combined"].rsplit("/", 1)[0]
    lines = [f"workspace   {ws}", f"result      {ws}/result.json"]
    lines += [f"model       {name}: {path}" for name, path in result["models"].items()]
    lines.append(f"logs        {result['logs']['combined']} (one per site in {ws}/<site>/log.txt)")
    for name, info in result["tracking"].items():
        if isinstance(info, dict) and info.get("view"):
            lines.append(f"{name:<11} {info['view']}")
            if info["view"].startswith("mlflow ui") and importlib.util.find_spec("flask") is None:
                lines.append(f"{'':<11} (mlflow ui needs the full mlflow package: pip install mlflow)")
    for restart in result.get("restarts", []):
        lines.append(f"restarted   worker {restart['worker']} ({restart['reason']}): {', '.join(restart['sites'])}")
    for line in lines:  # whole lines, so that commands and paths can be copied
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    for name, info in result["tracking"].items():
        if isinstance(info, dict) and (info.get("errors") or info.get("dropped")):
            problems = "; ".join(info.get("errors", []))
            console.print(
                f"{name}: {info.get('dropped', 0)} records dropped; {problems}",
                style="red",
                soft_wrap=True,
                markup=False,
            )
    timing = result["timing"]
    if result["status"] == "completed":
        console.print(f"[green]completed[/] in {timing['total_s']:.1f} s (start-up {timing['startup_s']:.1f} s)")
    else:
        console.print(
            f"failed after {timing['total_s']:.1f} s: {result['error']}", style="red", soft_wrap=True, markup=False
        )
