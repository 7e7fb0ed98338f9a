"""Named registries of buildable components (backbones, architectures, datasets).

Each entry pairs an *options* dataclass, which the config system validates, with a *builder*.
Options classes of one registry share a base class with a ``name`` field; a config value for
such a field is either a mapping ``{name: ..., other options}`` or the bare name as a string.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    options: type
    builder: Callable[..., T]
    doc: str


class Registry(Generic[T]):
    """A mapping from names to (options class, builder) pairs.

    ``shorthand`` optionally turns a string such as ``"split@2"`` into an options mapping.
    """

    def __init__(self, kind: str, shorthand: Callable[[str], dict[str, Any]] | None = None):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._shorthand = shorthand

    def register(self, name: str, options: type) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``builder`` under ``name`` with its options dataclass."""
        if not dataclasses.is_dataclass(options):
            raise TypeError(f"options for {self.kind} {name!r} must be a dataclass")

        def decorate(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            doc = (builder.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, options, builder, doc[0] if doc else "")
            return builder

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> Entry[T]:
        return self._entries[name]

    def expand(self, value: str) -> dict[str, Any]:
        """Turn a bare string into an options mapping (``"lenet"`` -> ``{"name": "lenet"}``)."""
        if self._shorthand is not None:
            expanded = self._shorthand(value)
            if expanded is not None:
                return expanded
        return {"name": value}
