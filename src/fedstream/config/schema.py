"""The shape of ``job.toml``: every key, its type and its default.

A job names its components by import path (``path``) and gives their constructor arguments (``args``); the
arguments are checked against the constructor's signature in :mod:`fedstream.config.components`. Unknown
keys are errors everywhere.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedstream.messages import TASK_STARTED


class Strict(BaseModel):
    """Base of every config table: unknown keys are errors and values are not coerced between types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ComponentConfig(Strict):
    """A component: the import path of its class (``package.module.Class``) and its constructor arguments."""

    path: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _dotted(cls, value: str) -> str:
        parts = value.split(".")
        if len(parts) < 2 or not all(part.isidentifier() for part in parts):
            raise ValueError(f"expected an import path such as 'package.module.Class', got {value!r}")
        return value


class ForwardConfig(Strict):
    """Which local events a site ships to the server, and the prefix their names get there."""

    events: list[str] = Field(default_factory=lambda: ["analytics"])
    prefix: str = "fed."

    @model_validator(mode="after")
    def _not_reserved(self) -> ForwardConfig:
        if TASK_STARTED in (self.prefix + name for name in self.events):
            raise ValueError(f"{TASK_STARTED!r} is the name of fedstream's own task marker: use another prefix")
        return self


class ServerConfig(Strict):
    """What runs on the server: the workflow and the components that receive events."""

    workflow: ComponentConfig
    receivers: dict[str, ComponentConfig] = Field(default_factory=dict)


class ScriptConfig(Strict):
    """A plain training script that a site runs instead of a trainer class (see :mod:`fedstream.client`).

    ``path`` is relative to the job folder; ``args`` are its command-line arguments. ``mode = "thread"`` runs
    it in a thread of the site's process; ``"process"`` runs it with its own Python interpreter.
    """

    path: str
    args: list[str] = Field(default_factory=list)
    mode: Literal["thread", "process"] = "thread"

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        path = PurePosixPath(value)
        if not value or path.is_absolute() or ".." in path.parts or path.suffix != ".py":
            raise ValueError(f"expected a .py file inside the job folder, such as 'train.py', got {value!r}")
        return value


class ClientConfig(Strict):
    """What runs on every site (a trainer class or a training script), and which of its events go to the
    server."""

    trainer: ComponentConfig | None = None
    script: ScriptConfig | None = None
    forward: ForwardConfig = Field(default_factory=ForwardConfig)

    @model_validator(mode="after")
    def _one_kind(self) -> ClientConfig:
        if (self.trainer is None) == (self.script is None):
            raise ValueError("give either [client.trainer] (a Trainer class) or [client.script] (a training script)")
        return self


class JobConfig(Strict):
    """A whole job: the model everyone shares, the server side and the client side."""

    name: str
    description: str = ""
    seed: int = 0  # seeds the initial model's weights
    model: ComponentConfig
    server: ServerConfig
    client: ClientConfig

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or not all(ch.isalnum() or ch in "-_." for ch in value):
            raise ValueError(f"expected letters, digits, '-', '_' or '.', got {value!r}")
        return value
