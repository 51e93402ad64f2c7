"""What the terminal shows: live progress per round and per site, then a summary of the run."""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedstream.events import EventBus
from fedstream.server.dispatch import TaskDone, TasksSent, TaskStarted
from fedstream.workflows.base import RoundStarted

_BAR = 24
_SHOWN = 3  # failures listed per round before "and N more"


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
        self.phases: dict[str, dict[str, int]] = {}
        self.running: dict[str, tuple[str, float]] = {}
        self.failures: list[str] = []
        self.live = Live(console=console, refresh_per_second=4, transient=True, get_renderable=self._render)

    def observe(self, bus: EventBus) -> None:
        bus.subscribe(RoundStarted, self._round_started)
        bus.subscribe(TasksSent, self._tasks_sent)
        bus.subscribe(TaskStarted, self._task_started)
        bus.subscribe(TaskDone, self._task_done)

    def __enter__(self) -> LiveProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live.is_started:
            self.live.stop()

    def _round_started(self, event: RoundStarted) -> None:
        if not self.live.is_started:
            self.live.start()
        self.round, self.num_rounds = event.round, event.num_rounds
        self.phases = {}

    def _tasks_sent(self, event: TasksSent) -> None:
        self.phases[event.kind] = {"total": len(event.sites), "done": 0, "failed": 0}

    def _task_started(self, event: TaskStarted) -> None:
        self.running[event.site] = (event.kind, time.monotonic())

    def _task_done(self, event: TaskDone) -> None:
        reply = event.reply
        self.running.pop(reply.site, None)
        phase = self.phases.setdefault(reply.kind, {"total": 0, "done": 0, "failed": 0})
        phase["done"] += 1
        if reply.failure is not None:
            phase["failed"] += 1
            self.failures.append(f"round {reply.round} {reply.kind} at {reply.site}: {reply.failure.reason}")

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


def _failures(failed: list[dict[str, str]]) -> str:
    """``train: site-3 (why); validate: ...``, the first few of each phase, then how many more."""
    by_phase: dict[str, list[dict[str, str]]] = {}
    for failure in failed:
        by_phase.setdefault(failure["phase"], []).append(failure)
    parts = []
    for phase, items in by_phase.items():
        shown = ", ".join(f"{f['site']} ({f['reason']})" for f in items[:_SHOWN])
        more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
        parts.append(f"{phase}: {shown}{more}")
    return "; ".join(parts)


def print_summary(console: Console, result: dict[str, Any]) -> None:
    """The rounds table, what failed, where the outputs are, and how to look at the tracking data."""
    rounds = result["rounds"]
    if rounds:
        keys = sorted({key for r in rounds for key in r["metrics"]}, key=lambda k: (k != "accuracy", k != "loss", k))
        table = Table(title=f"{result['job']} ({result['job_id']})", title_justify="left")
        table.add_column("round", justify="right")
        for key in keys:
            table.add_column(key, justify="right")
        table.add_column("duration", justify="right")
        table.add_column("sites trained", justify="right")
        for r in rounds:
            metrics = [f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys]
            trained = len(r["clients"]) + sum(f["phase"] != "validate" for f in r["failed"])
            table.add_row(str(r["round"]), *metrics, f"{r['duration_s']:.1f} s", f"{len(r['clients'])}/{trained}")
        console.print(table)
    cross = result.get("cross_site_eval")
    if cross:
        console.print(_cross_site_table(cross))
    lines = []
    for r in rounds:
        if r["failed"]:
            lines.append(f"round {r['round']:<5} failed: {_failures(r['failed'])}")
    for entry in result.get("membership", []):
        what = f"left ({entry['left']})" if "left" in entry else "joined again"
        lines.append(f"round {entry['round']:<5} {entry['site']} {what}")
    ws = result["logs"]["combined"].rsplit("/", 1)[0]
    lines += [f"workspace   {ws}", f"result      {ws}/result.json"]
    local = {name: path for name, path in result["models"].items() if name.startswith("local/")}
    lines += [f"model       {name}: {path}" for name, path in result["models"].items() if name not in local]
    if local:  # each site's last model, kept for the cross-site evaluation: one line, however many sites
        folder = next(iter(local.values())).rsplit("/", 1)[0]
        lines.append(f"models      each site's last local model ({len(local)}): {folder}/<site>.pt")
    per_site = set(result["logs"]) - {"combined", "server"}
    where = f"one per site in {ws}/<site>/log.txt" if per_site else "each site's own log stays on the site"
    lines.append(f"logs        {result['logs']['combined']} ({where})")
    for name, info in result["tracking"].items():
        if isinstance(info, dict) and info.get("view"):
            lines.append(f"{name:<11} {info['view']}")
            if "mlflow ui" in info["view"] and importlib.util.find_spec("flask") is None:
                lines.append(f"{'':<11} (mlflow ui needs the full mlflow package: pip install mlflow)")
    for line in lines:  # whole lines, so that commands and paths can be copied
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    for name, info in result["tracking"].items():
        if isinstance(info, dict) and (info.get("errors") or info.get("dropped")):
            problems = "; ".join(info.get("errors", [])[:_SHOWN])
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


def _cross_site_table(cross: dict[str, Any]) -> Table:
    """The cross-site matrix of the key metric: models down, the sites that validated them across."""
    key = cross["key_metric"]
    table = Table(title=f"cross-site {key}", title_justify="left")
    table.add_column("model \\ site")
    for site in cross["sites"]:
        table.add_column(site, justify="right")
    for model in cross["models"]:
        scores = cross["metrics"].get(model, {})
        cells = [f"{scores[site][key]:.4f}" if key in scores.get(site, {}) else "-" for site in cross["sites"]]
        table.add_row(model, *cells)
    return table


def print_outcome(console: Console, result: dict[str, Any]) -> None:
    """One line: how the job ended, the last round's metrics (or the error), and where ``result.json`` is."""
    where = result["logs"]["combined"].rsplit("/", 1)[0] + "/result.json"
    if result["status"] == "completed":
        last: dict[str, Any] = result["rounds"][-1] if result["rounds"] else {"metrics": {}, "round": 0}
        metrics = " ".join(f"{key}={value:.4g}" for key, value in last["metrics"].items())
        dropped = sum(info.get("dropped", 0) for info in result["tracking"].values() if isinstance(info, dict))
        lost = f", {dropped} tracking records dropped" if dropped else ""
        line = f"completed: round {last['round']} {metrics} ({result['timing']['total_s']:.1f} s{lost}) {where}"
    else:
        line = f"{result['status']}: {result['error']} ({where})"
    console.print(line, soft_wrap=True, markup=False, highlight=False)
