"""The shape of ``job.toml``: every key, its type and its default.

A job names its components by import path (``path``) and gives their constructor arguments (``args``); the
arguments are checked against the constructor's signature in :mod:`fedstream.config.components`. Unknown
keys are errors everywhere.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


class ServerConfig(Strict):
    """What runs on the server: the workflow and the components that receive events."""

    workflow: ComponentConfig
    receivers: dict[str, ComponentConfig] = Field(default_factory=dict)


class ClientConfig(Strict):
    """What runs on every site: the trainer, and which of its events go to the server."""

    trainer: ComponentConfig
    forward: ForwardConfig = Field(default_factory=ForwardConfig)


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
