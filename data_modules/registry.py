"""The one registry class behind every extension axis: task kinds, KD losses, weightings,
teacher sources, schedules, loggers and data sources.

Each axis is a ``Registry`` of named callables (classes or functions). A config picks one by
``name`` or ``{name: ..., **options}``; the options are checked against the callable's signature
before any work, so a plugin takes options without a library edit. It lives in data_modules, the
bottom layer, so the data sources use it without importing mtkd.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T", bound=Callable[..., Any])

#: parameters a config option can set: those passed by keyword
_OPTION_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def parse_choice(key: str, value: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A config choice, ``name`` or ``{name: ..., **options}``, as (name, options)."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        options = dict(value)
        return options.pop("name"), options
    raise ValueError(f"{key}={value!r}: give a name or {{name: <name>, <option>: <value>, ...}}")


def origin(obj: Any) -> str:
    """Where ``obj`` was defined, ``module.qualname``: what a duplicate-name error names."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


class Registry(Generic[T]):
    """The callables of one axis by name.

    ``key`` is the config key that picks one (``run.weighting``), ``axis`` what an entry is
    (``weighting strategy``), ``how`` how a plugin adds one (``@register_weighting(name)``): the
    errors name all three. The library calls an entry with ``given`` positional arguments of its
    own; the entry's further keyword parameters are the options a config may set.
    """

    def __init__(self, key: str, axis: str, how: str, given: int = 0) -> None:
        self.key = key
        self.axis = axis
        self.how = how
        self.given = given
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        """Add ``obj`` under ``name`` (without ``obj``: a decorator that does). The same object,
        or one of the same module and name (its module imported again), replaces the entry; any
        other object under a taken name is refused, naming the one registered first."""
        if obj is None:
            return lambda found: self.register(name, found)
        known = self._entries.get(name)
        if known is not None and known is not obj and origin(known) != origin(obj):
            raise ValueError(
                f"{self.axis} {name!r} is already registered by {origin(known)}; register "
                f"{origin(obj)} under another name"
            )
        self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's stand-in plugin, or one unloaded)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str | None, key: str | None = None) -> T:
        """The entry ``name``; unknown: an error at ``key`` (default ``self.key``) listing the
        registered names and how to add one."""
        if name not in self._entries:
            raise ValueError(
                f"{key or self.key}={name!r} is unknown; choose one of: "
                f"{', '.join(self.names()) or '(none registered)'} (or register another "
                f"{self.axis} with {self.how} in a plugin module)"
            )
        return self._entries[name]

    def resolve(
        self, choice: str | Mapping[str, Any], key: str | None = None
    ) -> tuple[T, dict[str, Any]]:
        """The entry and options of a config ``choice``, ``name`` or ``{name: ..., **options}``."""
        name, options = parse_choice(key or self.key, choice)
        return self.get(name, key), self.check_options(name, options, key)

    def check_options(
        self, name: str, options: Mapping[str, Any], key: str | None = None
    ) -> dict[str, Any]:
        """``options`` for the entry ``name``, checked against its keyword parameters (after
        the ``given`` ones the library passes): unknown or missing ones are refused with the
        valid ones listed."""
        params = list(inspect.signature(self.get(name, key)).parameters.values())[self.given :]
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return dict(options)
        valid = [p.name for p in params if p.kind in _OPTION_KINDS]
        unknown = sorted(set(options) - set(valid))
        missing = [
            p.name
            for p in params
            if p.kind in _OPTION_KINDS and p.default is p.empty and p.name not in options
        ]
        if unknown or missing:
            problems = []
            if unknown:
                problems.append(f"unknown options {unknown}")
            if missing:
                problems.append(f"missing options {missing}")
            raise ValueError(
                f"{key or self.key}={name!r}: {' and '.join(problems)}; valid options: "
                f"{', '.join(valid) or '(none: give the name alone)'}"
            )
        return dict(options)

    def create(self, choice: str | Mapping[str, Any], *given: Any, key: str | None = None) -> Any:
        """Call the entry a config ``choice`` names with the library's ``given`` arguments and
        the choice's options."""
        entry, options = self.resolve(choice, key)
        return entry(*given, **options)
