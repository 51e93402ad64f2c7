"""Process set-up: what every child process fedstream starts does first (die with its parent, leave Ctrl-C
to it), and SIGTERM taken as Ctrl-C by the long-running commands."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from types import FrameType


def detach_from_terminal_signals() -> None:
    """Ignore Ctrl-C (the parent decides when its children stop) and die when the parent dies, so that a
    killed parent leaves no orphans (Linux; elsewhere the parent's cleanup has to do)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


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
