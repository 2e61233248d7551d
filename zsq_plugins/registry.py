"""Name registries filled from built-ins and from an entry-point group, loaded lazily.

Third parties extend zsq_plugins by declaring an entry point in their own packaging, e.g.

    [project.entry-points."zsq_plugins.adapters"]
    aimet = "my_package.aimet_adapter:AimetAdapter"

The group is read on the first lookup, not at import time, and an entry point is imported only
when its name is asked for.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from zsq_plugins.errors import DuplicatePluginError, UnknownPluginError

log = logging.getLogger(__name__)

T = TypeVar("T")

ADAPTERS_GROUP = "zsq_plugins.adapters"
GENERATORS_GROUP = "zsq_plugins.generators"


class Registry(Generic[T]):
    """Maps names to objects of one kind (``kind`` names it in messages)."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T] = {}
        self._entry_points: dict[str, EntryPoint] | None = None

    def register(self, name: str, item: T) -> T:
        """Adds ``item`` under ``name``; a name already taken (here or by a plugin) raises."""
        if not name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}")
        if name in self._items or name in self._discovered():
            raise DuplicatePluginError(
                f"{self.kind} {name!r} is already registered; choose another name or remove "
                "the other registration"
            )
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` registers the decorated object."""
        return lambda item: self.register(name, item)

    def _discovered(self) -> dict[str, EntryPoint]:
        if self._entry_points is None:
            found: dict[str, EntryPoint] = {}
            if self.entry_point_group is not None:
                for point in entry_points(group=self.entry_point_group):
                    if point.name in found and found[point.name].value != point.value:
                        raise DuplicatePluginError(
                            f"two installed packages register the {self.kind} {point.name!r} "
                            f"({found[point.name].value} and {point.value}); uninstall one"
                        )
                    found[point.name] = point
            self._entry_points = found
        return self._entry_points

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        point = self._discovered().get(name)
        if point is None:
            raise UnknownPluginError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names()) or 'none'}"
            )
        log.debug("loading %s %r from entry point %s", self.kind, name, point.value)
        item = point.load()
        self._items[name] = item
        return item

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names, filtered by a shell-style wildcard (``"*fmnist"``)."""
        every = set(self._items) | set(self._discovered())
        return sorted(n for n in every if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items or name in self._discovered())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def refresh(self) -> None:
        """Forgets what was read from entry points (after installing a plugin at run time)."""
        self._entry_points = None
