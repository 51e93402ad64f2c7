"""Turn a ``path`` + ``args`` pair into a class and validated constructor arguments.

Arguments are checked against the constructor's signature and type hints (pydantic, strict mode), so a
misspelt argument or a string where a number belongs is reported before anything runs. Nested tables are
accepted where the constructor asks for a pydantic model.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from fedstream.config.errors import from_validation_error
from fedstream.errors import ConfigError


def import_object(path: str, key: str) -> Any:
    """Import ``package.module.Name``; failures name ``key`` and what could not be found."""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} for {path!r}: {exc}", key=key) from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        names = sorted(name for name in vars(module) if not name.startswith("_"))
        raise ConfigError(
            f"module {module_name!r} has no {attr!r}; it defines: {', '.join(names) or 'nothing'}", key=key
        ) from None


def args_model(cls: type) -> type[BaseModel]:
    """A pydantic model of ``cls``'s constructor arguments.

    Each argument is a field named ``arg_<name>`` with the alias ``<name>``, so that an argument may be called
    anything (``validate``, ``copy``, ``json``...) without clashing with pydantic's own attributes. A
    constructor that passes ``**kwargs`` on to its base class takes the base's arguments too (a workflow built
    on FedAvg takes FedAvg's); other keys are allowed only where the chain ends in a bare ``**kwargs``.
    """
    fields: dict[str, Any] = {}
    parameters, open_ended = _parameters(cls)
    for param in parameters:
        default = ... if param.default is param.empty else param.default
        annotation = Any if param.annotation is param.empty or isinstance(param.annotation, str) else param.annotation
        fields[f"arg_{param.name}"] = (annotation, Field(default, alias=param.name))
    extra = "allow" if open_ended else "forbid"
    config = ConfigDict(extra=extra, strict=True, arbitrary_types_allowed=True)  # type: ignore[typeddict-item]
    return create_model(f"{cls.__name__}Args", __config__=config, **fields)


def _parameters(cls: type) -> tuple[list[inspect.Parameter], bool]:
    """The named parameters of ``cls``'s constructor, following ``**kwargs`` to the base class's, and whether
    any other keyword is accepted."""
    try:
        signature = inspect.signature(cls, eval_str=True)
    except NameError:  # an annotation names something undefined: check the argument names only
        signature = inspect.signature(cls)
    own = [p for p in signature.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return own, False
    defining = [c for c in cls.__mro__ if "__init__" in vars(c)]
    base = defining[1] if len(defining) > 1 else object
    if base is object:
        return own, True
    inherited, open_ended = _parameters(base)
    names = {p.name for p in own}
    return own + [p for p in inherited if p.name not in names], open_ended


def validate_args(cls: type, args: dict[str, Any], key: str) -> BaseModel:
    """Validate ``args`` for ``cls``; errors are located under ``key`` (``server.workflow.args``)."""
    try:
        return args_model(cls).model_validate(args)
    except ValidationError as exc:
        raise from_validation_error(exc, prefix=key) from None


def dump_args(validated: BaseModel) -> dict[str, Any]:
    """The full argument table, defaults included, as TOML-writable data (``None`` values are left out)."""
    data = validated.model_dump(mode="json", by_alias=True)
    return {name: value for name, value in data.items() if value is not None}


def instantiate(cls: type, validated: BaseModel, key: str) -> Any:
    """Call ``cls`` with validated arguments; a ``ValueError`` or ``ConfigError`` it raises names ``key``."""
    kwargs = {field.alias or name: getattr(validated, name) for name, field in type(validated).model_fields.items()}
    kwargs.update(validated.model_extra or {})
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise exc.located(prefix=key) from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{cls.__name__} rejected its arguments: {exc}", key=key) from exc
    except Exception as exc:  # a constructor that fails for its own reasons: still located, never a traceback
        raise ConfigError(f"{cls.__name__}(...) raised {type(exc).__name__}: {exc}", key=key) from exc
