"""A name -> builder table: the one way an extension point (loss terms, metrics, datasets) is opened.

A new entry is one decorated definition in its own file; configs name it. Looking up a name that is
not registered raises `RegistryError` (a `ConfigError`) listing what is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from clip3d_core.config import ConfigError, from_dict

T = TypeVar("T")


class RegistryError(ConfigError):
    """An unknown or duplicated registry name."""


class Registry(Generic[T]):
    """Entries of one kind (e.g. "loss term"), registered by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` on a class or function."""

        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise RegistryError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
            self._entries[name] = entry
            return entry

        return add

    def unregister(self, name: str) -> None:
        """Remove an entry (tests registering a temporary one clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = sorted(self._entries)
            raise RegistryError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def with_options(self, name: str, options: Mapping[str, Any], where: str) -> tuple[T, Any]:
        """Entry `name` and its typed options: the entry's nested ``Options`` dataclass built from
        `options` (unknown keys raise `ConfigError` naming `where`)."""
        entry = self.get(name)
        options_cls = getattr(entry, "Options", None)
        if options_cls is None or not dataclasses.is_dataclass(options_cls):
            raise RegistryError(f"{self.kind} {name!r} has no Options dataclass")
        return entry, from_dict(options_cls, dict(options), where=where)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
