"""The tracking record every writer produces and every receiver consumes, and the rules it must follow.

A record travels in an :class:`Analytics` event, on the wire as a JSON object by field name. The rules are
MLflow's (the strictest backend), so anything a writer accepts every receiver stores as given; writers apply
them at the call site, receivers again on arrival because the server trusts no site.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from fedstream.events import FED_PREFIX

METRIC = "metric"
PARAM = "param"
TAG = "tag"
TEXT = "text"  # TensorBoard-style text: ``key`` is a tag, ``step`` a step
ARTIFACT = "artifact"  # MLflow-style text file: ``key`` is a relative path in the run's artifacts
KINDS = (METRIC, PARAM, TAG, TEXT, ARTIFACT)

MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000  # MLflow truncates longer param values
MAX_TAG_LENGTH = 8000  # MLflow truncates longer tag values
MAX_TEXT_LENGTH = 1_000_000  # text and text files: one event must stay a small part of a message
MAX_STEP = 2**63 - 1
MAX_TIME_S = 253_402_300_799  # 9999-12-31 23:59:59 UTC: every backend stores it (MLflow: int64 milliseconds)
_KEY = re.compile(r"^[/\w.\- :]*$")
_valid_keys: set[str] = set()


class Record(NamedTuple):
    """One tracked value. ``step`` is 0 for params and tags; ``time`` is the site's clock, in seconds."""

    kind: str
    key: str
    value: float | str
    step: int
    time: float

    def to_wire(self) -> dict[str, Any]:
        """The record as JSON values by field name."""
        return {"kind": self.kind, "key": self.key, "value": self.value, "step": self.step, "time": self.time}


@dataclass(frozen=True)
class Analytics:
    """The event a tracking writer fires on its site's bus; a site forwards it to the server."""

    name: ClassVar[str] = "analytics"
    record: Record

    def to_wire(self) -> dict[str, Any]:
        return self.record.to_wire()


FED_ANALYTICS = FED_PREFIX + Analytics.name
"""The name of sites' tracking records on the server (with the default forwarding prefix)."""


def check_key(key: Any, what: str = "key") -> str:
    """A metric, param or tag name MLflow accepts: 1-250 of letters, digits, ``_ - . space / :``, no empty,
    ``.`` or ``..`` path segments."""
    if type(key) is str and key in _valid_keys:
        return key
    if not isinstance(key, str):
        raise TypeError(f"{what} must be a str, got {type(key).__name__} {key!r}")
    if not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{what} {key[:60]!r} must have 1 to {MAX_KEY_LENGTH} characters, it has {len(key)}")
    if not _KEY.match(key):
        bad = sorted({ch for ch in key if not _KEY.match(ch)})
        raise ValueError(
            f"{what} {key!r} has characters MLflow does not accept ({''.join(bad)!r}); use letters, digits, "
            "'_', '-', '.', ' ', '/' and ':'"
        )
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"{what} {key!r} must not start or end with '/' or hold '//', '.' or '..' segments")
    _valid_keys.add(key)
    return key


def check_value(value: Any, key: str) -> float:
    """A metric value as a float: numbers, numpy scalars and one-element tensors; NaN and +-inf pass through."""
    if type(value) is float:
        return value
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"metric {key!r}: value must be a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)  # numbers, numpy scalars, 0-d / one-element tensors
    except OverflowError:
        raise ValueError(f"metric {key!r}: value {value!r:.60} is too large for a float") from None
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: value must be a number, got {type(value).__name__}") from None


def check_step(step: Any, key: str) -> int:
    """A step: an integer from 0 to 2**63 - 1 (bool is not an integer here)."""
    if type(step) is int and 0 <= step <= MAX_STEP:  # the common case, without the slower checks below
        return step
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{key!r}: step must be an int, got {type(step).__name__} {step!r}")
    number = int(step)
    if not 0 <= number <= MAX_STEP:
        raise ValueError(f"{key!r}: step must be >= 0, got {number}")
    return number


def check_path(path: Any) -> str:
    """A relative artifact path inside a run: no absolute paths, no ``..``, no empty segments."""
    if not isinstance(path, str):
        raise TypeError(f"artifact path must be a str, got {type(path).__name__}")
    if not path or path.startswith(("/", "\\")) or "\\" in path or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"artifact path {path!r} must be a relative POSIX path, e.g. 'notes/round_1.txt'")
    parts = path.split("/")
    if ".." in parts or "." in parts or "" in parts:
        raise ValueError(f"artifact path {path!r} must not hold '..', '.' or empty segments")
    return path


def check_time(wall_time: Any, key: str) -> float:
    """A wall-clock time in seconds since the epoch, from 0 to the end of the year 9999."""
    if type(wall_time) is float and 0.0 <= wall_time <= MAX_TIME_S:  # the common case (NaN fails it)
        return wall_time
    if isinstance(wall_time, bool) or not isinstance(wall_time, numbers.Real):
        raise TypeError(f"{key!r}: time must be a number of seconds, got {type(wall_time).__name__}")
    seconds = float(wall_time)
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_TIME_S):
        raise ValueError(
            f"{key!r}: time must be a finite number of seconds since the epoch, from 0 to {MAX_TIME_S} "
            f"(the year 9999); got {wall_time}"
        )
    return seconds


def check_timestamp_ms(timestamp: Any, key: str) -> float:
    """An MLflow-style timestamp in milliseconds since the epoch, as seconds (see :func:`check_time`)."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, numbers.Real):
        raise TypeError(f"{key!r}: timestamp must be milliseconds since the epoch, got {type(timestamp).__name__}")
    milliseconds = float(timestamp)
    if not (math.isfinite(milliseconds) and 0 <= milliseconds <= MAX_TIME_S * 1000):
        raise ValueError(
            f"{key!r}: timestamp must be a finite number of milliseconds since the epoch, "
            f"from 0 to {MAX_TIME_S * 1000} (the year 9999); got {timestamp}"
        )
    return milliseconds / 1000


RESERVED_TAGS = ("mlflow.", "fedstream.")
RESERVED_TAG_NAMES = ("site",)


def check_tag_name(key: Any) -> str:
    """A tag name a site may set: not one of the tags MLflow and fedstream set on a site's run."""
    name = check_key(key, "tag name")
    if name.startswith(RESERVED_TAGS) or name in RESERVED_TAG_NAMES:
        raise ValueError(
            f"tag {name!r} is reserved: MLflow and fedstream set the tags mlflow.*, fedstream.* and site on a "
            "site's run (its name, its parent run, its site); choose another name"
        )
    return name


def check_text(value: Any, kind: str, key: str) -> str:
    """A param, tag or text value: a str no longer than what every backend stores in full."""
    if not isinstance(value, str):
        raise TypeError(f"{kind} {key!r}: value must be a str, got {type(value).__name__}")
    limit = {PARAM: MAX_PARAM_LENGTH, TAG: MAX_TAG_LENGTH}.get(kind, MAX_TEXT_LENGTH)
    if len(value) > limit:
        hint = " (log long text with log_text)" if kind in (PARAM, TAG) else ""
        raise ValueError(f"{kind} {key!r}: value has {len(value):,} characters, more than the {limit:,} allowed{hint}")
    return value


def from_wire(data: Any) -> Record:
    """Rebuild and re-check a record that arrived from a site; raises ``ValueError``/``TypeError`` if invalid."""
    if not isinstance(data, dict) or set(data) != set(Record._fields):
        raise ValueError(f"a tracking record has the fields {', '.join(Record._fields)}, got {data!r:.80}")
    kind, key = data["kind"], data["key"]
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    key = check_path(key) if kind == ARTIFACT else check_tag_name(key) if kind == TAG else check_key(key)
    value = check_value(data["value"], key) if kind == METRIC else check_text(data["value"], kind, key)
    return Record(kind, key, value, check_step(data["step"], key), check_time(data["time"], key))
