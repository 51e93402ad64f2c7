"""The process a deployed client starts for each job: ``python -m fedstream.deploy.site_process KIT``.

It ties its life to the client's before it imports anything slow, so that a client stopped (or killed) while
it starts this process leaves no orphan behind: the client names itself in
:data:`~fedstream.children.PARENT`, and a client that died before the tie was made ends this process at
once. Then it runs :func:`fedstream.deploy.client.site_main`.
"""

import os
import sys

from fedstream.children import detach_from_terminal_signals, end_with_parent

if __name__ == "__main__":
    detach_from_terminal_signals()
    end_with_parent()
    from fedstream.deploy.client import site_main

    site_main(sys.argv[1])
    os._exit(0)  # all is sent and logged: skip PyTorch's second-long teardown
