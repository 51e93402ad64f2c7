"""Process set-up: what every child process fedstream starts does first (die with its parent, leave Ctrl-C
to it), and SIGTERM taken as Ctrl-C by the long-running commands."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

PARENT = "FEDSTREAM_PARENT"
"""Environment variable: the pid of the fedstream process that started this one and that this one must not
outlive (see :func:`end_with_parent`)."""


def detach_from_terminal_signals() -> None:
    """Ignore Ctrl-C (the parent decides when its children stop) and die when the parent dies, so that a
    killed parent leaves no orphans (Linux; elsewhere the parent's cleanup has to do)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _on_parent_death(signal.SIGKILL)


def end_with_parent(how: signal.Signals = signal.SIGKILL) -> None:
    """If the process that started this one named itself in :data:`PARENT` (poc starting its server and
    clients, a client its site process), send ``how`` to this one when that process dies, and end this one at
    once if it died already, before the tie was made. Without :data:`PARENT` (a server or a client started by
    hand, or by a service manager), nothing changes."""
    parent = os.environ.pop(PARENT, "")
    if not parent:
        return
    _on_parent_death(how)
    if parent != str(os.getppid()):
        os._exit(0)


def _on_parent_death(how: signal.Signals) -> None:
    """Linux sends ``how`` to this process when the thread that started it ends (elsewhere: nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, how)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM stops this process the way Ctrl-C does (a ``KeyboardInterrupt``), so that its
    clean-up runs (long-running commands: the deployed server, poc)."""

    def interrupt(number: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
