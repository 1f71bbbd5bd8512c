"""Typed configuration from YAML: line-aware loading and dataclass validation.

Recipes, filter sets, stage and filter parameters are all annotated dataclasses
filled from YAML. Errors name the file, the line and the bad key, because a
typo in a threshold is the most common way to ruin a curation run silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe, filter set or override that cannot be used as written."""


Where = dict[tuple, int]  # key path -> 1-based line


def load_yaml(path: Path) -> tuple[Any, Where]:
    """Parse a YAML file, returning its value and the line of every key path in it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    lines: Where = {}
    constructor = yaml.SafeLoader("")

    def build(n: yaml.Node, at: tuple) -> Any:
        lines[at] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            out = {}
            for key_node, value_node in n.value:
                key = constructor.construct_object(key_node, deep=True)
                if key in out:
                    raise ConfigError(
                        f"{path}:{key_node.start_mark.line + 1}: duplicate key {key!r}"
                    )
                out[key] = build(value_node, (*at, key))
                lines[(*at, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(item, (*at, i)) for i, item in enumerate(n.value)]
        return constructor.construct_object(n, deep=True)

    return (build(node, ()) if node is not None else None), lines


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, what: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints widen to floats), or raise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, what)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{what}: {value!r} is not {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{what}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{what}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [coerce(v, item_tp, f"{what}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{what}: expected a mapping, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{what}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{what}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{what}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{what}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{what}: unsupported parameter type {_type_name(tp)}")


def build(cls: type, params: Any, what: str, skip: tuple[str, ...] = ()) -> Any:
    """Instantiate the dataclass ``cls`` from a mapping, checking every key and type.

    ``skip`` names fields that are filled by the caller rather than from YAML.
    """
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{what}: expected a mapping of parameters, got {params!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in skip}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise ConfigError(f"{what}: unknown key {unknown[0]!r} (known keys: {known})")
    kwargs = {}
    for name, field in fields.items():
        if name in params:
            kwargs[name] = coerce(params[name], hints[name], f"{what}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{what}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from exc


def params_of(obj: Any, skip: tuple[str, ...] = ()) -> dict:
    """The YAML-able parameters of a dataclass instance (the inverse of ``build``)."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.init and f.name not in skip:
            value = getattr(obj, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
