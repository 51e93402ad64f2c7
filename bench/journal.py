"""Benchmark of the events journals (what a deployed site and server pay so that a kill loses no event);
writes bench/results/journal.md.

    python bench/journal.py [--repeat 5]

1. Site: ``Outbox.put`` of 200,000 metric events (as ``log_metric`` makes them), delivered to an inbox in
   the same process, with the site's journal against without it.
2. Server: ``Inbox.receive`` of the same events in batches of 1,000 (as sites send them), after a task's
   marker (as a deployed site's task begins: the inbox tracks the task's steps, and the journal records them
   with each batch), fired to a subscriber that keeps them, with the server's journal against without it.

Each pair runs alternating, ``--repeat`` times; the table holds medians of the cost per event and their ratio.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import time
from pathlib import Path

from measure import REPO, start, write_results

from fedstream.events import EventBus
from fedstream.messages import TASK_STARTED, EventBatch, WireEvent
from fedstream.server.inbox import Inbox
from fedstream.server.journal import EventJournal
from fedstream.site.outbox import Outbox

OUT = REPO / "bench" / "out" / "journal"
RESULTS = REPO / "bench" / "results" / "journal.md"
EVENTS = 200_000
BATCH = 1000


def metric(step: int) -> WireEvent:
    data = {"kind": "metric", "key": "train_loss", "value": 0.5, "step": step, "time": 1.7e9}
    return WireEvent("fed.analytics", data)


def site(journal: Path | None) -> float:
    """Microseconds per ``Outbox.put``, the events delivered and acknowledged at the end."""
    inbox = Inbox(EventBus())
    outbox: Outbox

    def send(batch: EventBatch) -> None:
        outbox.acknowledge(inbox.receive("site-1", batch))

    outbox = Outbox("site-1", send, journal=journal)
    events = [metric(step) for step in range(EVENTS)]
    began = time.perf_counter()
    for event in events:
        outbox.put(event)
    assert outbox.close(stall_timeout_s=60) == 0
    return (time.perf_counter() - began) / EVENTS * 1e6


def server(journal: Path | None) -> float:
    """Microseconds per event in ``Inbox.receive``."""
    bus = EventBus()
    kept: list[object] = []
    bus.subscribe("fed.analytics", kept.append)
    events = None
    if journal is not None:
        events = EventJournal(journal, lambda: None)
        events.open()
    inbox = Inbox(bus, events)
    sent = [WireEvent(TASK_STARTED, {"task": "1.train.site-1.1"}), *(metric(step) for step in range(EVENTS))]
    batches = [EventBatch("site-1", "s", at + 1, sent[at : at + BATCH]) for at in range(0, len(sent), BATCH)]
    began = time.perf_counter()
    for batch in batches:
        inbox.receive("site-1", batch)
    seconds = time.perf_counter() - began
    assert len(kept) == EVENTS
    if events is not None:
        events.close()
    return seconds / EVENTS * 1e6


def main() -> None:
    repeat, _ = start(__doc__, OUT)
    costs: dict[str, list[float]] = {"site": [], "site+journal": [], "server": [], "server+journal": []}
    for i in range(repeat):
        shutil.rmtree(OUT / "files", ignore_errors=True)
        costs["site"].append(site(None))
        costs["site+journal"].append(site(OUT / "files" / "outbox.jsonl"))
        costs["server"].append(server(None))
        costs["server+journal"].append(server(OUT / "files" / "events.jsonl"))
        print(f"run {i + 1}: " + ", ".join(f"{name} {values[-1]:.2f} us" for name, values in costs.items()), flush=True)

    def med(name: str) -> float:
        return statistics.median(costs[name])

    def ratio(name: str) -> float:
        return statistics.median(j / p for j, p in zip(costs[f"{name}+journal"], costs[name], strict=True))

    lines = [
        "# Events journals benchmark",
        "",
        f"Command: `python bench/journal.py --repeat {repeat}` on {platform.node() or 'this machine'} "
        f"({platform.machine()}, Python {platform.python_version()}); {EVENTS:,} metric events, medians of "
        f"{repeat} alternating runs.",
        "",
        "| path | without journal | with journal | ratio |",
        "|---|---:|---:|---:|",
        f"| site: `Outbox.put` per event (the logging call's share) | {med('site'):.2f} us | "
        f"{med('site+journal'):.2f} us | {ratio('site'):.2f} |",
        f"| server: `Inbox.receive` per event (batches of {BATCH:,}) | {med('server'):.2f} us | "
        f"{med('server+journal'):.2f} us | {ratio('server'):.2f} |",
        "",
        "Only a deployed site and server keep journals; the simulator does not. The site writes each event as it "
        "is logged (one `write` call each), the server each batch of new events (one `write` call per batch) "
        "before acknowledging it; neither calls fsync.",
        "",
    ]
    write_results(RESULTS, lines)


if __name__ == "__main__":
    main()
