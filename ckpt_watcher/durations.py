"""Durations as people write them in a policy or on a command line: ``30s``, ``15m``, ``24h``, ``7d``,
``1h30m``; ``0`` alone means none. One grammar for ``trash.grace``, ``trash empty --older-than`` and
``restore --since``.
"""

from __future__ import annotations

import re

UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Ten years: a longer grace is a typo, and the bound keeps every sum a small, exact float.
LONGEST_SECONDS = 3650 * 86400

_PART = re.compile(r"([0-9]+)([smhd])")
_WHOLE = re.compile(r"(?:[0-9]+[smhd])+")


class DurationError(ValueError):
    """A duration that cannot be read; the message says what is expected."""


def parse_duration(text: str) -> int:
    """Seconds in ``text`` (``24h``, ``1h30m``, ``0``); DurationError for anything else.

    A bare number other than ``0`` is refused: ``grace: 24`` could mean hours as well as seconds.
    """
    stripped = text.strip()
    if stripped == "0":
        return 0
    if not _WHOLE.fullmatch(stripped):
        hint = "; a number needs a unit" if stripped.isdigit() else ""
        raise DurationError(
            f"expected a duration such as 30s, 15m, 24h, 7d or 1h30m (units s, m, h, d){hint}, got {text!r}"
        )
    seconds = sum(int(amount) * UNIT_SECONDS[unit] for amount, unit in _PART.findall(stripped))
    if seconds > LONGEST_SECONDS:
        raise DurationError(f"must be at most 3650d (ten years), got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``86400`` -> ``1d``, ``5400`` -> ``1h30m``, ``0`` -> ``0s``: the largest units first."""
    remaining = max(0, round(seconds))
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in sorted(UNIT_SECONDS.items(), key=lambda item: -item[1]):
        amount, remaining = divmod(remaining, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)
