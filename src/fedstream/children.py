"""What every child process fedstream starts does first: die with its parent, leave Ctrl-C to it."""

from __future__ import annotations

import signal
import sys


def detach_from_terminal_signals() -> None:
    """Ignore Ctrl-C (the parent decides when its children stop) and die when the parent dies, so that a
    killed parent leaves no orphans (Linux; elsewhere the parent's cleanup has to do)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
