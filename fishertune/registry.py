"""One small registry class for backbones, heads and tuning methods (timm style).

Names are unique: registering a name twice is a programming error. Looking up an unknown name is a
user error with a did-you-mean suggestion.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from fishertune.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping with loud duplicates and helpful misses."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add(obj) if obj is not None else add

    def get(self, name: str, where: str = "") -> T:
        """Return the entry for ``name`` or raise a :class:`UserError` naming the close matches."""
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            at = f"{where}: " if where else ""
            raise UserError(
                f"{at}unknown {self.kind} {name!r}; {hint}known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
