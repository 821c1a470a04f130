"""Sizes as the policy writes them (``500GiB``, ``1.5TB``, ``10%``) and as the tool prints them.

A size is an integer number of bytes or a string: a number and a unit, ``B``, ``KB``, ``MB``, ``GB``,
``TB`` (powers of 1000) or ``KiB``, ``MiB``, ``GiB``, ``TiB`` (powers of 1024). Units are spelt
exactly so: ``500 gb`` is refused rather than guessed at (``Gb`` would be gigabits elsewhere). A
fraction is allowed with a unit larger than a byte and rounds down to whole bytes. ``keep_free`` also
takes a percentage of the file system's size, ``N%`` with ``0 <= N < 100``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # decimal is imported where a size is read (a policy that sets one), not at start-up
    from decimal import Decimal

UNITS: dict[str, int] = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
UNIT_LIST = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
_NUMBER = r"(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
_SIZE = re.compile(rf"\s*{_NUMBER}\s*(?P<unit>[A-Za-z]+)\s*")
_PERCENT = re.compile(rf"\s*{_NUMBER}\s*%\s*")
# Far beyond any disk, small enough that nothing downstream overflows a C long (statvfs figures).
LARGEST_SIZE = 2**62


class SizeError(ValueError):
    """A value that is not a size (the message says what a size is)."""


def size_bytes(value: int | str) -> int:
    """The bytes a size stands for: an int as it is, a string with its unit; raise SizeError."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise SizeError("not a size")
    if isinstance(value, int):
        if value < 0:
            raise SizeError("must be at least 0")
        return _bounded(value)
    match = _SIZE.fullmatch(value)
    if match is None:
        raise SizeError("not a number and a unit")
    unit = match["unit"]
    if unit not in UNITS:
        raise SizeError("unknown unit")
    from decimal import ROUND_FLOOR, Decimal  # noqa: PLC0415  (see the import above)

    number = Decimal(match["number"])
    if unit == "B" and number != number.to_integral_value():
        raise SizeError("a number of bytes must be whole")
    return _bounded(int((number * UNITS[unit]).to_integral_value(rounding=ROUND_FLOOR)))


def _bounded(count: int) -> int:
    if count > LARGEST_SIZE:
        raise SizeError(f"must be at most {LARGEST_SIZE} bytes")
    return count


@dataclass(frozen=True, slots=True)
class FreeSpaceSetting:
    """``keep_free`` read: a number of bytes, or a fraction of the file system's size."""

    text: str
    bytes: int | None = None
    fraction: Decimal | None = None

    def bytes_of(self, total_bytes: int) -> int:
        """The free bytes asked for on a file system of ``total_bytes`` (a percentage rounds up)."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        from decimal import ROUND_CEILING  # noqa: PLC0415  (see the import above)

        return int((self.fraction * total_bytes).to_integral_value(rounding=ROUND_CEILING))


def free_space_setting(value: int | str) -> FreeSpaceSetting:
    """``keep_free`` as written: a size or ``N%``; raise SizeError."""
    if isinstance(value, str) and "%" in value:
        match = _PERCENT.fullmatch(value)
        if match is None:
            raise SizeError("not a percentage")
        from decimal import Decimal  # noqa: PLC0415  (see the import above)

        percent = Decimal(match["number"])
        if percent >= 100:
            raise SizeError("a percentage must be below 100%")
        return FreeSpaceSetting(text=value.strip(), fraction=percent / 100)
    return FreeSpaceSetting(text=str(value).strip(), bytes=size_bytes(value))


def human_bytes(count: int) -> str:
    """``1.5 GiB``-style sizes."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
