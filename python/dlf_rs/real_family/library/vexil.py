"""vexil 0.1: a tiny fictional library of immutable value runs (the real family's task).

A ``Run`` holds a sequence of values and can only be used through its methods: it is not
iterable, has no length and no indexing, so code that treats it as a list fails. Steps return a
new ``Run``; finishers return a plain Python value.

Steps:    sift(pred)    keep the values where pred(value) is true
          morph(fn)     replace every value v by fn(v)
          head(n)       the first n values          skip(n)    all but the first n
          turn()        the values in reverse order
          order(key=None)  sorted ascending (by key(value) when given; stable)
          distinct()    drop repeated values, keeping the first of each
Finishers: fold()  the sum (0 for an empty run)   weigh()  the number of values
          peak()  the largest value               base()   the smallest (both raise on empty)
          glue(sep="")  the values as strings joined by sep
          bag()   the values as a list
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Run", "VexilError"]
__version__ = "0.1"


class VexilError(ValueError):
    """Raised by ``peak`` and ``base`` on an empty run."""


class Run:
    """An immutable run of values; see the module docstring for its methods."""

    __slots__ = ("__values",)

    def __init__(self, values: Iterable[Any] = ()) -> None:
        self.__values = tuple(values)

    def __repr__(self) -> str:
        return f"vexil.Run({list(self.__values)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.__values == self.__values

    def __hash__(self) -> int:
        return hash(self.__values)

    def __iter__(self) -> Any:
        raise TypeError("'Run' object is not iterable")

    # steps
    def sift(self, pred: Callable[[Any], Any]) -> Run:
        return Run(v for v in self.__values if pred(v))

    def morph(self, fn: Callable[[Any], Any]) -> Run:
        return Run(fn(v) for v in self.__values)

    def head(self, n: int) -> Run:
        return Run(self.__values[: max(n, 0)])

    def skip(self, n: int) -> Run:
        return Run(self.__values[max(n, 0) :])

    def turn(self) -> Run:
        return Run(reversed(self.__values))

    def order(self, key: Callable[[Any], Any] | None = None) -> Run:
        return Run(sorted(self.__values, key=key))

    def distinct(self) -> Run:
        seen: list[Any] = []
        for v in self.__values:
            if v not in seen:
                seen.append(v)
        return Run(seen)

    # finishers
    def fold(self) -> Any:
        return sum(self.__values, 0) if self.__values else 0

    def weigh(self) -> int:
        return len(self.__values)

    def peak(self) -> Any:
        if not self.__values:
            raise VexilError("peak of an empty run")
        return max(self.__values)

    def base(self) -> Any:
        if not self.__values:
            raise VexilError("base of an empty run")
        return min(self.__values)

    def glue(self, sep: str = "") -> str:
        return sep.join(str(v) for v in self.__values)

    def bag(self) -> list[Any]:
        return list(self.__values)
