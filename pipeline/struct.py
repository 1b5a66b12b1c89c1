"""``Struct``: a simple attribute container, the return type of ``Task.run``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["Struct"]


class Struct:
    """A bag of named values, set by keyword and read as attributes.

    Examples
    --------
    >>> result = Struct(exposure=1, catalog=[2])
    >>> result.exposure
    1
    >>> sorted(result.getDict())
    ['catalog', 'exposure']
    """

    def __init__(self, **kwargs: Any) -> None:
        for name, value in kwargs.items():
            self.__safeAdd(name, value)

    def __safeAdd(self, name: str, value: Any) -> None:
        if name.startswith("__") or (hasattr(Struct, name) and not name.startswith("_Struct")):
            raise ValueError(f"Struct field name {name!r} is reserved (it would hide a method or be private)")
        self.__dict__[name] = value

    def getDict(self) -> dict[str, Any]:
        """A shallow copy of the fields as a dict."""
        return dict(self.__dict__)

    def mergeItems(self, struct: Struct, *names: str) -> None:
        """Copy the named fields of another struct into this one (names must be new here).

        Raises
        ------
        RuntimeError
            If a name is already a field of this struct.
        """
        for name in names:
            if name in self.__dict__:
                raise RuntimeError(f"Struct already has a field {name!r}")
            self.__safeAdd(name, getattr(struct, name))

    def copy(self) -> Struct:
        """A shallow copy."""
        return Struct(**self.getDict())

    def __contains__(self, name: object) -> bool:
        return name in self.__dict__

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self.__dict__.items())

    def __len__(self) -> int:
        return len(self.__dict__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Struct) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"Struct({items})"
