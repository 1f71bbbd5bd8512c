"""Typed configuration from YAML: line-aware loading and dataclass validation.

Recipes, filter sets, stage and filter parameters are all annotated dataclasses
filled from YAML. Errors name the file, the line and the bad key, because a
typo in a threshold is the most common way to ruin a curation run silently.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe, filter set or override that cannot be used as written."""


Where = dict[tuple, int]  # key path -> 1-based line


# --- value ranges -----------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value for an error message: NaN and the infinities spelled as a reader expects."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return repr(value)


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric parameter may take, declared beside its field::

        min_side: Annotated[int, Range(0)] = 200
        fraction: Annotated[float, Range(0, 1, low_open=True, why="the share to keep")]

    ``build`` checks it after the type; NaN is never in a range. A float outside
    a ``finite`` range's bounds or infinite is refused: ``finite=False`` lets a
    field take an infinity its bounds allow (``score_threshold``'s ``min: -.inf``).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    finite: bool = True
    why: str = ""  # what the bound means, shown in the error

    def __str__(self) -> str:
        low, high = self.low, self.high
        if low is not None and high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_show(low)}, {_show(high)}{right}"
        if low is not None:
            return f"greater than {_show(low)}" if self.low_open else f"at least {_show(low)}"
        if high is not None:
            return f"less than {_show(high)}" if self.high_open else f"at most {_show(high)}"
        return "a number"

    def check(self, value: float, what: str) -> None:
        """Raise ConfigError naming ``what`` unless ``value`` is in the range."""
        why = f" ({self.why})" if self.why else ""
        low, high = self.low, self.high
        outside = (
            value != value  # NaN
            or (low is not None and (value < low or (self.low_open and value == low)))
            or (high is not None and (value > high or (self.high_open and value == high)))
        )
        if value != value and not any(b is not None and math.isfinite(b) for b in (low, high)):
            raise ConfigError(f"{what} must not be NaN{why}")
        if outside:
            raise ConfigError(f"{what} must be {self}{why}, got {_show(value)}")
        if self.finite and isinstance(value, float) and math.isinf(value):
            raise ConfigError(f"{what} must be a finite number{why}, got {_show(value)}")


#: Common ranges, for ``field: Count = 1`` rather than spelling out the Annotated.
Count = Annotated[int, Range(1)]  # at least one: rows, shards, workers, iterations
NonNegative = Annotated[int, Range(0)]  # a size or a count that may be zero
Positive = Annotated[float, Range(0, low_open=True)]  # a duration, a rate
Cosine = Annotated[float, Range(-1, 1)]  # a cosine similarity threshold


# --- YAML ---------------------------------------------------------------------------------------

#: At most this many aliases (``*name``) in one YAML text, and at most this many nodes
#: reached through them. A recipe may reuse a filter list or two; an alias "bomb" (each
#: level aliasing the one below several times) would expand exponentially.
MAX_ALIASES = 16
MAX_ALIAS_NODES = 1_000

#: The only tags a node may carry: YAML 1.1's core types, which plain values resolve to
#: anyway. ``!!python/...``, ``!!set``, ``!!omap``, ``!!binary``, ``!custom`` are refused.
_CORE = "tag:yaml.org,2002:"
SCALAR_TAGS = {_CORE + t for t in ("null", "bool", "int", "float", "str", "timestamp")}
NODE_TAGS = {yaml.ScalarNode: SCALAR_TAGS, yaml.SequenceNode: {_CORE + "seq"},
             yaml.MappingNode: {_CORE + "map"}}  # fmt: skip


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE) :] if tag.startswith(_CORE) else tag


class _Alias(yaml.Node):
    """An alias as written (``*name``): where it is, and the node it names."""

    id = "alias"

    def __init__(self, target: yaml.Node, start_mark: yaml.Mark, end_mark: yaml.Mark):
        super().__init__(target.tag, target, start_mark, end_mark)
        self.target = target


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader whose composer counts aliases and keeps each one's own position."""

    def __init__(self, text: str, place: Callable[[int], str]):
        super().__init__(text)
        self.place = place
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if not self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        self.aliases += 1
        if self.aliases > MAX_ALIASES:
            raise ConfigError(
                f"{self.place(mark.line + 1)}: more than {MAX_ALIASES} YAML aliases (*name); "
                "write the values out"
            )
        node = super().compose_node(parent, index)
        return _Alias(node, mark, mark)


def parse_yaml(text: str, source: str, lines_in_place: bool = True) -> tuple[Any, Where]:
    """Parse YAML text strictly: core tags only, a few small aliases, no duplicate keys.

    Returns the value and the line of every key path. Errors start with
    ``source:line`` (only ``source`` when ``lines_in_place`` is False: an override).
    """

    def place(line: int) -> str:
        return f"{source}:{line}" if lines_in_place else source

    loader = _StrictLoader(text, place)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from exc
    finally:
        loader.dispose()
    lines: Where = {}
    constructor = yaml.SafeLoader("")
    expanding: list[_Alias] = []  # the aliases being walked through, outermost first
    active: set[int] = set()  # the collections on the current path: an alias to one loops
    through_aliases = 0

    def plain(n: yaml.Node) -> yaml.Node:
        """``n`` itself (an alias: the node it names), once its tag is known to be allowed."""
        n = n.target if isinstance(n, _Alias) else n
        if n.tag not in NODE_TAGS[type(n)]:
            kind = {yaml.ScalarNode: "value", yaml.SequenceNode: "list"}.get(type(n), "mapping")
            raise ConfigError(
                f"{place(n.start_mark.line + 1)}: YAML tag {_short_tag(n.tag)} on a {kind} is "
                "not allowed (plain values, lists and mappings only)"
            )
        return n

    def scalar(n: yaml.Node) -> Any:
        try:
            return constructor.construct_object(n, deep=True)
        except Exception as exc:  # a core tag on a value it cannot read: !!int abc, !!bool x
            raise ConfigError(
                f"{place(n.start_mark.line + 1)}: cannot read {n.value!r} as {_short_tag(n.tag)}"
            ) from exc

    def build(n: yaml.Node, at: tuple) -> Any:
        nonlocal through_aliases
        lines[at] = n.start_mark.line + 1
        if isinstance(n, _Alias):
            if id(n.target) in active:
                raise ConfigError(f"{place(lines[at])}: a YAML alias that contains itself")
            expanding.append(n)
            try:
                value = build(n.target, at)
            finally:
                expanding.pop()
            lines[at] = n.start_mark.line + 1  # where the alias is, not where its value is
            return value
        if expanding:
            through_aliases += 1
            if through_aliases > MAX_ALIAS_NODES:
                raise ConfigError(
                    f"{place(expanding[0].start_mark.line + 1)}: YAML aliases expand to more "
                    f"than {MAX_ALIAS_NODES} values; write the values out"
                )
        n = plain(n)
        if isinstance(n, yaml.ScalarNode):
            return scalar(n)
        active.add(id(n))
        try:
            if isinstance(n, yaml.SequenceNode):
                return [build(item, (*at, i)) for i, item in enumerate(n.value)]
            out = {}
            for key_node, value_node in n.value:
                key_line = key_node.start_mark.line + 1
                if key_node.tag == _CORE + "merge":
                    raise ConfigError(f"{place(key_line)}: YAML merge keys (<<) are not supported")
                key_node = plain(key_node)
                if not isinstance(key_node, yaml.ScalarNode):
                    raise ConfigError(f"{place(key_line)}: a key must be a plain value")
                key = scalar(key_node)
                if key in out:
                    raise ConfigError(f"{place(key_line)}: duplicate key {key!r}")
                out[key] = build(value_node, (*at, key))
                lines[(*at, key)] = key_line
            return out
        finally:
            active.discard(id(n))

    return (build(node, ()) if node is not None else None), lines


def load_yaml(path: Path) -> tuple[Any, Where]:
    """Parse a YAML file, returning its value and the line of every key path in it.

    The file is read strictly (``parse_yaml``): a tag other than YAML's core types, more
    than a few aliases, or a duplicate key is a ConfigError naming the file and line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    return parse_yaml(text, str(path))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, what: str, finite: bool = True) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints widen to floats), or raise.

    ``Annotated[T, Range(...)]`` checks the range after the type. A float must be
    finite unless its Range says otherwise (``finite`` is that Range's say).
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        ranges = [r for r in extras if isinstance(r, Range)]
        value = coerce(value, base, what, finite=not ranges)
        for r in ranges:
            r.check(value, what)
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
                return coerce(value, arg, what, finite)
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
        value = float(value)
        if finite and not math.isfinite(value):
            raise ConfigError(f"{what}: expected a finite number, got {_show(value)}")
        return value
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


def build(
    cls: type,
    params: Any,
    what: str,
    skip: tuple[str, ...] = (),
    origins: dict[str, str] | None = None,
) -> Any:
    """Instantiate the dataclass ``cls`` from a mapping, checking every key, type and range.

    ``skip`` names fields that are filled by the caller rather than from YAML.
    ``origins`` gives, for a key whose value came from elsewhere than ``what`` says (an
    override), the ``what`` to name in its errors instead; a rule across fields
    (``__post_init__``) that fails names the first such origin, since the change broke it.
    """
    origins = origins or {}
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{what}: expected a mapping of parameters, got {params!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in skip}
    unknown = sorted(set(params) - set(fields), key=str)
    if unknown:
        known = ", ".join(fields) or "none"
        where = origins.get(unknown[0], what)
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known keys: {known})")
    kwargs = {}
    for name, field in fields.items():
        if name in params:
            kwargs[name] = coerce(params[name], hints[name], f"{origins.get(name, what)}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{what}: missing required key {name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        where = next((origins[n] for n in fields if n in origins and n in params), what)
        raise ConfigError(f"{where}: {exc}") from exc


def params_of(obj: Any, skip: tuple[str, ...] = ()) -> dict:
    """The YAML-able parameters of a dataclass instance (the inverse of ``build``)."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.init and f.name not in skip:
            value = getattr(obj, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
