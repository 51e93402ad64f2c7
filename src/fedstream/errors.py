"""The exceptions fedstream raises, all rooted at :class:`FedstreamError`.

* FedstreamError
  + ConfigError        a job config value is wrong (names the file and the dotted key)
  + DataError          a data set is missing or corrupt (names the path and how to fix it)
  + JobFailed          the job ran but could not finish (names the round, the sites and the causes)
  + TrackingError      the tracking backend refused or is unreachable
  + TransportError     a link between server and site broke or carried a malformed message

This module imports nothing from fedstream, so every other module may import it.
"""

from __future__ import annotations


class FedstreamError(Exception):
    """Base of every error fedstream raises on purpose."""


class ConfigError(FedstreamError):
    """A job configuration problem, located by file and dotted key.

    ``key`` is relative to ``file`` (``server.workflow.args.min_clients``); either may be empty when the
    problem is not tied to one place. Components raise it with a key relative to their own arguments and
    the loader prefixes their location with :meth:`located`.
    """

    def __init__(self, message: str, *, file: str = "", key: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.key = key

    def located(self, *, file: str = "", prefix: str = "") -> ConfigError:
        """Return a copy placed in ``file`` with ``prefix`` put before the key."""
        key = ".".join(part for part in (prefix, self.key) if part)
        return ConfigError(self.message, file=file or self.file, key=key)

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.file, self.key) if part)
        return f"{where}: {self.message}" if where else self.message


class DataError(FedstreamError):
    """A data set could not be found, downloaded or verified."""


class JobFailed(FedstreamError):
    """The job could not finish; the message names the round, the sites and their causes."""


class TrackingError(FedstreamError):
    """The tracking backend (MLflow) is unreachable, refuses us, or lost records."""


class TransportError(FedstreamError):
    """A link between server and a site broke, or a message on it was malformed."""
