"""The ``fedstream`` command line."""

from fedstream.cli.main import main

__all__ = ["main"]
