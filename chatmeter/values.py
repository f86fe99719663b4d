"""Value classes that cross to the SQLite writer process (`db/sqlite_process.py`) on
every exchange: the arguments and results of its transactions."""

from __future__ import annotations

from typing import Any


class Sendable:
    """For frozen slots dataclasses: pickles as the class and its field values in order,
    about four times faster than the state dict `dataclasses` pickles by default (which
    looks up the fields on every call)."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        names: tuple[str, ...] = self.__slots__  # the fields, in order
        return (type(self), tuple([getattr(self, name) for name in names]))
