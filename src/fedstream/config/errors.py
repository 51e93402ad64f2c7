"""Turn pydantic validation errors into :class:`ConfigError` messages a user can act on."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from fedstream.errors import ConfigError


def _describe(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing required key"
    got = error.get("input")
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if kind in {"model_type", "dataclass_exact_type", "dict_type"}:
        message = "expected a table"
    return f"{message} (got {type(got).__name__} {got!r})" if "got" not in message else message


def from_validation_error(exc: ValidationError, *, prefix: str = "") -> ConfigError:
    """One :class:`ConfigError` for the first problem in ``exc``, located under ``prefix``."""
    errors = exc.errors()
    first = errors[0]
    key = ".".join(str(part) for part in (prefix, *first["loc"]) if part != "")
    message = _describe(first)
    if len(errors) > 1:
        others = "; ".join(
            f"{'.'.join(str(p) for p in (prefix, *e['loc']) if p != '')}: {_describe(e)}" for e in errors[1:]
        )
        message += f" (also: {others})"
    return ConfigError(message, key=key)
