"""Run a plain training script as a site's executor: the site's side of :mod:`fedstream.client`.

The script runs once for the whole job and keeps its own loop; it asks for tasks with ``receive()`` and
answers them with ``send()``. The executor hands it each task and waits for its answer, or for the script to
end, whichever comes first. Two ways to run it:

- ``thread`` (the default): in a thread of the site's process. Cheapest; the script shares the process (a
  script that calls ``os._exit`` ends the site host with it).
- ``process``: with its own Python interpreter, talking to the site over a socket pair in the wire format
  (never a pickle). Its tracking calls travel to the site as events, its output goes to the site's log.

A script that ends, crashes or asks for the next task without answering fails the task it owes, with the
script's last output lines in the reason.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from contextvars import ContextVar
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedstream import wire
from fedstream.children import detach_from_terminal_signals
from fedstream.config.schema import ForwardConfig, ScriptConfig
from fedstream.errors import FedstreamError
from fedstream.events import EventBus
from fedstream.messages import TRAIN, EventBatch, Result, Shutdown, Task, WireEvent
from fedstream.site.context import SiteContext, register, run_as
from fedstream.site.executor import Executor, TaskOutput

ENV = "FEDSTREAM_SCRIPT"
"""The environment variable through which a script started in ``process`` mode finds its site."""

TAIL_LINES = 8
"""How many of the script's last output lines a failure quotes."""

END_TIMEOUT_S = 60.0
"""How long a script may go on after the job ended (saving its own files, say) before it is stopped."""


class ScriptError(FedstreamError):
    """The script did something the conversation does not allow (send twice, receive before sending)."""


# -- the script's side -----------------------------------------------------------------------------------------


class Session(ABC):
    """The script's end of the conversation with its site: a task is received, then answered, in turn.

    ``shares_memory``: the site reads the answer's arrays in place (``thread`` mode), so they must not be
    the script's live model.
    """

    site: SiteContext
    shares_memory = False
    _waiting: Task | None = None  # fetched by running(), not yet received
    _owed: Task | None = None  # received, not yet answered
    _over = False

    @abstractmethod
    def next_task(self) -> Task | None:
        """The next task (waits for it); ``None`` once the job has ended."""

    @abstractmethod
    def answer(self, task: Task, output: TaskOutput) -> None:
        """Answer ``task``."""

    def running(self) -> bool:
        """Wait for the next task; ``False`` once the job has ended."""
        self._check_answered("running()")
        if self._waiting is None and not self._over:
            self._waiting = self.next_task()
            self._over = self._waiting is None
        return not self._over

    def receive(self) -> Task:
        """The next task, to be answered with :meth:`send`."""
        self._check_answered("receive()")
        if not self.running():
            raise ScriptError("the job has ended: there are no more tasks (loop with `while fl.running():`)")
        task, self._waiting = self._waiting, None
        assert task is not None
        self._owed = task
        return task

    def send(self, output: TaskOutput) -> None:
        """Answer the task received last."""
        task = self._owed
        if task is None:
            raise ScriptError("send() without a task to answer: each receive() is answered by one send()")
        if task.kind == TRAIN and not output.weights:
            raise ScriptError(
                f"the train task of round {task.round} needs the trained weights: "
                "fl.send(model.state_dict(), num_samples=...)"
            )
        self._owed = None
        self.answer(task, output)

    def _check_answered(self, call: str) -> None:
        if self._owed is not None:
            raise ScriptError(
                f"{call} was called before send() answered the {self._owed.kind} task of round {self._owed.round}"
            )


_session: ContextVar[Session | None] = ContextVar("fedstream_script", default=None)
_process_session: Session | None = None


def current_session() -> Session | None:
    """The session of the script running on this thread (``thread`` mode) or in this process (``process``
    mode, once :func:`connect` ran); ``None`` elsewhere."""
    return _session.get() or _process_session


def connect() -> Session | None:
    """In a script started in ``process`` mode: connect to the site (once); ``None`` in any other process."""
    global _process_session
    if _process_session is None and ENV in os.environ:
        _process_session = _ChildSession(json.loads(os.environ[ENV]))
    return _process_session


def launch() -> None:
    """The ``process`` mode's child: die with the site, connect to it, then run the script as ``__main__``
    (``sys.argv`` = the script and its arguments)."""
    detach_from_terminal_signals()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))
    connect()
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except Exception as exc:  # the traceback from the script's own frames: the site quotes the last lines
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != sys.argv[0]:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
        sys.exit(1)


# -- the site's side -------------------------------------------------------------------------------------------


class ScriptEnded(FedstreamError):
    """The site's script is over, so it cannot answer the task."""


@dataclass(frozen=True)
class _Ended:
    """The script ended: how (``train.py exited with code 1``), and its last output lines."""

    how: str
    tail: list[str]

    def explain(self, what: str) -> str:
        lines = "".join(f"\n  {line}" for line in self.tail)
        return f"{self.how} {what}" + (f"; its last output lines:{lines}" if lines else "")


class ScriptExecutor(Executor):
    """Runs ``script`` (a file of the job in ``job_dir``) for a site and relays its tasks and answers."""

    def __init__(self, job_dir: Path, script: ScriptConfig, forward: ForwardConfig) -> None:
        self.path = job_dir / script.path
        self.config = script
        self.forward = forward
        self._answers: queue.Queue[TaskOutput | _Ended] = queue.Queue()
        self._ended: _Ended | None = None
        self._runner: _Runner | None = None
        self._tail: _Tail | None = None

    @property
    def name(self) -> str:
        return self.config.path

    def argv(self, site: SiteContext) -> list[str]:
        """The script and its arguments, with ``{site}``, ``{index}`` and ``{num_sites}`` replaced by the
        site's name, its index (from 0) and the number of sites."""
        values = {"{site}": site.name, "{index}": str(site.index), "{num_sites}": str(site.num_sites)}
        args = []
        for arg in self.config.args:
            for token, value in values.items():
                arg = arg.replace(token, value)
            args.append(arg)
        return [str(self.path), *args]

    def setup(self, site: SiteContext) -> None:
        self._tail = _Tail(site.name)
        logging.getLogger().addHandler(self._tail)
        runner = _ThreadRunner if self.config.mode == "thread" else _ProcessRunner
        self._runner = runner(self, site)

    def execute(self, task: Task) -> TaskOutput:
        assert self._runner is not None, "setup() runs before the first task"
        if self._ended is not None:
            raise ScriptEnded(self._ended.explain("before this task"))
        self._runner.give(task)
        answer = self._answers.get()
        if isinstance(answer, TaskOutput):
            return answer
        self._ended = answer
        raise ScriptEnded(answer.explain(f"without answering the {task.kind} task of round {task.round}"))

    def close(self) -> None:
        if self._runner is not None:
            self._runner.end()
        if self._tail is not None:
            logging.getLogger().removeHandler(self._tail)

    # -- called by the runners ---------------------------------------------------------------------------------
    def answered(self, output: TaskOutput) -> None:
        self._answers.put(output)

    def ended(self, how: str) -> None:
        """The script is over: ``how`` it ended (its last output lines are added here)."""
        self._answers.put(_Ended(f"{self.name} {how}", self._tail.lines() if self._tail is not None else []))


class _Runner(ABC):
    @abstractmethod
    def give(self, task: Task) -> None:
        """Hand ``task`` to the script."""

    @abstractmethod
    def end(self) -> None:
        """The job is over: let the script finish (stop it after :data:`END_TIMEOUT_S`)."""


class _ThreadRunner(_Runner):
    """The script in a thread of this process, its module namespace its own (``__name__ == "__main__"``)."""

    def __init__(self, executor: ScriptExecutor, site: SiteContext) -> None:
        self._executor = executor
        self._session = _ThreadSession(site, executor)
        self._thread = threading.Thread(target=self._run, name=f"script-{site.name}", daemon=True)
        self._thread.start()

    def give(self, task: Task) -> None:
        self._session.tasks.put(task)

    def end(self) -> None:
        self._session.tasks.put(None)
        self._thread.join(END_TIMEOUT_S)
        if self._thread.is_alive():
            self._session.site.log.warning(
                "%s still runs %g s after the job ended; leaving it", self._executor.name, END_TIMEOUT_S
            )

    def _run(self) -> None:
        path = self._executor.path
        site = self._session.site
        run_as(site)
        _session.set(self._session)
        sys.argv = self._executor.argv(site)
        how, failure = "ended", None
        try:
            code = compile(path.read_bytes(), str(path), "exec")
            exec(code, {"__name__": "__main__", "__file__": str(path), "__builtins__": __builtins__})
        except SystemExit as exc:
            how = f"called sys.exit({exc.code!r})" if exc.code not in (None, 0) else "ended"
        except BaseException as exc:
            how, failure = f"failed with {type(exc).__name__}: {exc}{_where(exc, path)}", exc
        self._executor.ended(how)  # first: the traceback is not among the script's last output lines
        if failure is not None:
            site.log.error("%s failed:\n%s", path.name, "".join(traceback.format_exception(failure)).rstrip())


class _ThreadSession(Session):
    shares_memory = True

    def __init__(self, site: SiteContext, executor: ScriptExecutor) -> None:
        self.site = site
        self.tasks: queue.Queue[Task | None] = queue.Queue()
        self.executor = executor

    def next_task(self) -> Task | None:
        return self.tasks.get()

    def answer(self, task: Task, output: TaskOutput) -> None:
        self.executor.answered(output)


class _ProcessRunner(_Runner):
    """The script as a child process: tasks and answers over a socket pair, its output into the site's log."""

    def __init__(self, executor: ScriptExecutor, site: SiteContext) -> None:
        self._executor = executor
        self._site = site
        ours, theirs = socket.socketpair()
        self._conn = Connection(ours.detach())
        info = {
            "fd": theirs.fileno(),
            "site": site.name,
            "index": site.index,
            "num_sites": site.num_sites,
            "job_name": site.job_name,
            "job_id": site.job_id,
            "workspace": str(site.workspace),
            "forward": executor.forward.events,
        }
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from fedstream.site.script import launch; launch()", *executor.argv(site)],
            pass_fds=(theirs.fileno(),),
            env={**os.environ, ENV: json.dumps(info), "PYTHONUNBUFFERED": "1", **_thread_settings()},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own: what it starts ends with it (_stop_group)
        )
        theirs.close()
        self._output = threading.Thread(target=self._read_output, name=f"script-output-{site.name}", daemon=True)
        self._output.start()
        threading.Thread(target=self._read_messages, name=f"script-{site.name}", daemon=True).start()

    def give(self, task: Task) -> None:
        with contextlib.suppress(OSError):  # the script is gone: its reader reports how it ended
            self._conn.send_bytes(wire.encode(task))

    def end(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send_bytes(wire.encode(Shutdown("the job ended")))
        try:
            self._process.wait(END_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._site.log.warning(
                "%s still runs %g s after the job ended; stopping it", self._executor.name, END_TIMEOUT_S
            )
            self._process.kill()
            self._process.wait()
        self._stop_group()
        self._output.join(5)
        self._conn.close()

    def _stop_group(self) -> None:
        """Kill what the script started and left running (its process group: the session it leads), once the
        script's own process has ended; those processes would outlive the job, and hold its output open."""
        with contextlib.suppress(ProcessLookupError, PermissionError):  # none left
            os.killpg(self._process.pid, signal.SIGKILL)

    def _read_output(self) -> None:
        assert self._process.stdout is not None
        run_as(self._site)
        for raw in self._process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._site.log.info("%s", line)

    def _read_messages(self) -> None:
        run_as(self._site)
        try:
            while True:
                message = wire.decode(self._conn.recv_bytes())
                if isinstance(message, EventBatch):
                    for event in message.events:
                        self._site.emit(_Relayed(event.name, event.data))
                elif isinstance(message, Result):
                    self._executor.answered(
                        TaskOutput(message.num_samples, message.metrics, message.weights, message.extra)
                    )
        except (EOFError, OSError):
            pass
        except Exception as exc:  # an undecodable frame: the script is not talking fedstream
            self._site.log.error("%s sent an unreadable message: %s", self._executor.name, exc)
            self._process.kill()
        code = self._process.wait()
        self._stop_group()
        self._output.join(5)
        how = "ended" if code == 0 else f"exited with code {code}" if code > 0 else f"was killed by signal {-code}"
        self._executor.ended(how)


@dataclass(frozen=True)
class _Relayed:
    """An event the script fired in its own process, fired again on the site's bus."""

    name: str
    data: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return self.data


class _ChildSession(Session):
    """The script's side in ``process`` mode: its own site context, whose forwarded events go to the site."""

    def __init__(self, info: dict[str, Any]) -> None:
        self._conn = Connection(int(info["fd"]))
        self._lock = threading.Lock()
        self._events: list[WireEvent] = []
        self._oldest = 0.0
        self._seq = 0
        bus = EventBus()
        self.site = SiteContext(
            name=info["site"],
            index=int(info["index"]),
            num_sites=int(info["num_sites"]),
            job_name=info["job_name"],
            job_id=info["job_id"],
            workspace=Path(info["workspace"]),
            bus=bus,
            log=logging.getLogger(f"fedstream.site.{info['site']}"),
        )
        for name in info["forward"]:
            bus.subscribe(name, self._forward_as(name))
        register(self.site)
        run_as(self.site)

    def _forward_as(self, name: str) -> Any:
        def forward(event: Any) -> None:
            with self._lock:
                if not self._events:
                    self._oldest = time.monotonic()
                self._events.append(WireEvent(name, event.to_wire()))
                due = len(self._events) >= 1000 or time.monotonic() - self._oldest > 0.5
            if due:
                self._flush()

        return forward

    def _flush(self) -> None:
        with self._lock:
            events, self._events = self._events, []
            if events:
                self._send(EventBatch(self.site.name, "script", self._seq + 1, events))
                self._seq += len(events)

    def _send(self, message: EventBatch | Result) -> None:
        try:
            self._conn.send_bytes(wire.encode(message))
        except OSError as exc:
            raise FedstreamError(f"the site that started this script is gone ({exc})") from None

    def next_task(self) -> Task | None:
        self._flush()
        try:
            message = wire.decode(self._conn.recv_bytes())
        except (EOFError, OSError):
            return None
        return message if isinstance(message, Task) else None

    def answer(self, task: Task, output: TaskOutput) -> None:
        self._flush()
        with self._lock:
            result = Result(task.id, self.site.name, output.num_samples, output.metrics, output.weights, output.extra)
            self._send(result)


class _Tail(logging.Handler):
    """Keeps the last :data:`TAIL_LINES` lines logged for ``site`` (its prints included)."""

    def __init__(self, site: str) -> None:
        super().__init__()
        self._site = site
        self._lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "site", None) == self._site:
            for line in record.getMessage().splitlines():
                self._lines.append(line[:300])

    def lines(self) -> list[str]:
        return list(self._lines)


def _thread_settings() -> dict[str, str]:
    """The site's PyTorch thread count for the script's process (the simulator gives each worker its share of
    the cores; a script with PyTorch's default would use them all and fight the other sites for them)."""
    torch = sys.modules.get("torch")
    return {"OMP_NUM_THREADS": str(torch.get_num_threads())} if torch is not None else {}


def _where(exc: BaseException, path: Path) -> str:
    """`` (train.py, line 12)``: the script's own line closest to where ``exc`` was raised."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == str(path)]
    return f" ({path.name}, line {frames[-1].lineno})" if frames else ""
