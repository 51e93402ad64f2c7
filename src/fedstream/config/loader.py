"""Load a job folder: read ``job.toml``, apply ``--set`` overrides, validate everything, resolve components.

The result is a :class:`Job` whose config holds every value, defaults included, so that
``fedstream job show`` prints exactly what runs and that output loads back to the same job.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
from pydantic import BaseModel, ValidationError

from fedstream.config.components import dump_args, import_object, instantiate, validate_args
from fedstream.config.errors import from_validation_error
from fedstream.config.schema import JobConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fedstream.errors import ConfigError

JOB_FILE = "job.toml"
T = TypeVar("T")


@dataclass(frozen=True)
class Component:
    """A resolved component: its class, its validated arguments and where it sits in the config.

    ``overridden`` holds the dotted keys that ``--set`` gave, so that an error names ``(--set)`` for them.
    """

    key: str
    cls: type
    args: BaseModel
    source: str
    overridden: frozenset[str] = frozenset()

    def locate(self, error: ConfigError) -> ConfigError:
        """``error``, raised about this component's arguments (key relative to them), placed in the config."""
        return _located(error.located(prefix=f"{self.key}.args"), self.source, self.overridden)

    def build(self, base: type[T]) -> T:
        """Construct it; the class must derive from ``base``. Errors name the source file and key."""
        if not issubclass(self.cls, base):
            raise ConfigError(
                f"{self.cls.__module__}.{self.cls.__qualname__} is not a {base.__module__}.{base.__qualname__}",
                file=self.source,
                key=f"{self.key}.path",
            )
        try:
            built: T = instantiate(self.cls, self.args, f"{self.key}.args")
        except ConfigError as exc:
            raise _located(exc, self.source, self.overridden) from exc
        return built


@dataclass(frozen=True)
class Job:
    """A validated job: its folder, its fully resolved config and its resolved components."""

    dir: Path
    config: JobConfig
    components: dict[str, Component]
    source: str

    @property
    def name(self) -> str:
        return self.config.name

    def component(self, key: str) -> Component:
        """The component at ``key`` (``server.workflow``, ``model``, ``client.trainer``, ``server.receivers.x``)."""
        return self.components[key]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (every default written out)."""
        data = self.config.model_dump(mode="json", exclude_none=True)
        for key, comp in self.components.items():
            node = data
            for part in key.split("."):
                node = node[part]
            node["args"] = dump_args(comp.args)
        return data

    def to_toml(self) -> str:
        """The resolved config as TOML; loading it back gives the same job."""
        return tomli_w.dumps(self.to_dict())


def _located(error: ConfigError, source: str, overridden: frozenset[str]) -> ConfigError:
    """``error`` placed in ``source``, marked ``(--set)`` when its key (or a key within it) came from ``--set``;
    a constructor's error names only its arguments table, so any override inside that table counts."""
    by_override = any(
        error.key == k or error.key.startswith(k + ".") or k.startswith(error.key + ".") for k in overridden
    )
    return error.located(file=f"{source} (--set)" if by_override else source)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value``; the value is read as a TOML value, or taken as a plain string if it is not one."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise ConfigError(f"expected KEY=VALUE with a dotted key, got {text!r}", file="--set")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [part.strip() for part in parts], value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[str]:
    """Apply ``--set`` overrides to ``data`` in place; returns the dotted keys they set and the tables they
    made (an error about a key missing from such a table is the override's)."""
    keys = set()
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            if part not in node:
                keys.add(".".join(parts[: i + 1]))
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"{where!r} is a {type(child).__name__}, not a table", file="--set", key=".".join(parts)
                )
            node = child
        node[parts[-1]] = value
        keys.add(".".join(parts))
    return keys


# What each component must be, by import path (resolved on use, so this package imports nothing above it).
KINDS = {
    "model": "torch.nn.Module",
    "server.workflow": "fedstream.workflows.base.Workflow",
    "client.trainer": "fedstream.pt.trainer.Trainer",
    "server.receivers": "fedstream.server.receiver.Receiver",
}


def _leaves(node: Any, key: str) -> Iterator[tuple[str, Any]]:
    """Every value of a parsed config that is not a table or a list, with its dotted key (``a.b[2]`` in lists)."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _leaves(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaves(value, f"{key}[{index}]")
    else:
        yield key, node


def _component_keys(config: JobConfig) -> dict[str, str]:
    """Each component's dotted key and the import path of the base class it must derive from."""
    keys = {key: KINDS[key] for key in ("model", "server.workflow")}
    if config.client.trainer is not None:
        keys["client.trainer"] = KINDS["client.trainer"]
    keys.update({f"server.receivers.{name}": KINDS["server.receivers"] for name in config.server.receivers})
    return keys


def _get(config: JobConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def load_job(job_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Job:
    """Load and validate the job in ``job_dir``; any problem raises :class:`ConfigError` naming file and key.

    The job folder goes first on ``sys.path`` so the job imports its own modules without PYTHONPATH.
    """
    folder, data, source = _read(job_dir)
    return load_job_data(folder, data, list(overrides), source=source)


def check_job_config(job_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Check what can be checked without importing the job's code (its ``job.toml``, the overrides, the keys
    and their types), at once, before a command starts anything; :func:`load_job` checks the rest."""
    _, data, source = _read(job_dir)
    _validate(data, list(overrides), source)


def _read(job_dir: str | Path) -> tuple[Path, dict[str, Any], str]:
    folder = Path(job_dir).resolve()
    file = folder / JOB_FILE
    if not folder.is_dir():
        raise ConfigError("no such job folder", file=str(folder))
    if not file.is_file():
        raise ConfigError(f"the job folder has no {JOB_FILE}", file=str(file))
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=str(file)) from exc
    data.setdefault("name", folder.name)
    return folder, data, str(file)


def _validate(
    data: dict[str, Any], overrides: list[str], source: str
) -> tuple[JobConfig, Callable[[ConfigError], ConfigError], frozenset[str]]:
    """The overrides applied to ``data`` and the result validated; also how to locate a later error."""
    overridden = frozenset(apply_overrides(data, overrides))

    def where(error: ConfigError) -> ConfigError:
        return _located(error, source, overridden)

    for key, value in _leaves(data, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise where(ConfigError(f"{value} is not a finite number, which no setting takes", key=key))
    try:
        return JobConfig.model_validate(data), where, overridden
    except ValidationError as exc:
        raise where(from_validation_error(exc)) from None


def load_job_data(folder: Path, data: dict[str, Any], overrides: list[str], *, source: str) -> Job:
    """Validate already-parsed job data (a ``job.toml`` or a resolved config) for the job in ``folder``."""
    config, where, overridden = _validate(data, overrides, source)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    components = {}
    for key, kind in _component_keys(config).items():
        ref = _get(config, key)
        try:
            cls = import_object(ref.path, f"{key}.path")
            if not isinstance(cls, type):
                raise ConfigError(f"{ref.path!r} is a {type(cls).__name__}, not a class", key=f"{key}.path")
            if not issubclass(cls, import_object(kind, "")):
                raise ConfigError(f"{ref.path} is not a {kind}", key=f"{key}.path")
            components[key] = Component(key, cls, validate_args(cls, ref.args, f"{key}.args"), source, overridden)
        except ConfigError as exc:
            raise where(exc) from None
    script = config.client.script
    if script is not None:
        path = folder / script.path
        if not path.is_file():
            raise where(ConfigError(f"the job folder has no {script.path}", key="client.script.path"))
        try:
            compile(path.read_bytes(), str(path), "exec")
        except SyntaxError as exc:
            raise where(
                ConfigError(
                    f"{script.path} is not valid Python: {exc.msg} (line {exc.lineno})", key="client.script.path"
                )
            ) from None
    return Job(dir=folder, config=config, components=components, source=source)
