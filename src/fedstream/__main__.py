"""``python -m fedstream``: the same as the ``fedstream`` command."""

from fedstream.cli import run

run()
