"""The ``fedstream`` command line."""

from fedstream.cli.main import main, run

__all__ = ["main", "run"]
