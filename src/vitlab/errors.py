"""The one exception type vitlab raises for problems a user can fix, and the checks that raise it."""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


class VitlabError(ValueError):
    """A user-facing error: the message names the bad value and what is allowed instead."""


def brief(value: object) -> str:
    """A repr of `value` short enough for a one-line error, built without building the whole repr."""
    return _REPR.repr(value)[:200]


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise a VitlabError naming `name` when `value` is not one of `allowed`."""
    if value not in allowed:
        raise VitlabError(f"{name}={brief(value)} is not supported; allowed: {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; an open end excludes its bound."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False  # NaN and ±inf are never a sensible setting
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if math.isinf(self.high):
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1)  # [0, 1]
BELOW_1 = Range(0, 1, high_open=True)  # [0, 1)


def check_range(name: str, value: float, allowed: Range, hint: str = "") -> None:
    """Raise a VitlabError naming `name`, `value` and `allowed` when `value` lies outside it (NaN always does)."""
    if value not in allowed:
        raise VitlabError(f"{name}={brief(value)} must be {allowed}; {hint or f'set {name} to a value in that range'}")
