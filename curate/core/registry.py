"""Register classes by name with a decorator, not by if/elif dispatch."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", bound=type)


def registrar(registry: dict[str, type], attr: str, what: str) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory that files a class in ``registry`` and sets ``cls.<attr>``."""

    def register(name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            if name in registry:
                raise ValueError(f"{what} {name!r} is registered twice")
            setattr(cls, attr, name)
            registry[name] = cls
            return cls

        return wrap

    return register
