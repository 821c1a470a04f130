"""The clock this process measures what it has seen on: its own monotonic clock, never a file's time.

A file's time is its writer's clock, which may be behind (another host on NFS or Lustre), and this
machine's wall clock may step; neither moves ``time.monotonic``. So "left alone for the quiet time" is
judged, where a wrong yes would lose a checkpoint, by what this process saw unchanged for that long.
One function, so a test can drive it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Generic, TypeVar

KeyT = TypeVar("KeyT")
ValueT = TypeVar("ValueT")


def watcher_clock() -> float:
    """Seconds on this process's monotonic clock."""
    return time.monotonic()


class SeenSince(Generic[KeyT, ValueT]):
    """Since when, on ``watcher_clock``, this process has seen each key with the value it has now: the
    one memory behind every "seen unchanged for the quiet time" (a changed config, a directory
    checkpoint on disk or in a bucket). A new value restarts the key's watch; the callers bound it
    (``retain``, ``forget_watched_for``)."""

    __slots__ = ("_since",)

    def __init__(self) -> None:
        self._since: dict[KeyT, tuple[ValueT, float]] = {}

    def __len__(self) -> int:
        return len(self._since)

    def watched(self, key: KeyT, value: ValueT, now: float) -> float | None:
        """Seconds ``key`` has been seen with ``value`` by ``now`` (a ``watcher_clock`` reading); None
        when this is its first sighting with that value, whose watch starts at ``now``."""
        seen = self._since.get(key)
        if seen is not None and seen[0] == value:
            return now - seen[1]
        self._since[key] = (value, now)
        return None

    def forget(self, key: KeyT) -> None:
        """Drop ``key``'s watch: it starts again at its next sighting."""
        self._since.pop(key, None)

    def retain(self, keys: Iterable[KeyT]) -> None:
        """Keep only the watches of these keys (those still there)."""
        if self._since:
            since = self._since
            self._since = {key: since[key] for key in keys if key in since}

    def forget_watched_for(self, seconds: float, now: float) -> None:
        """Drop the keys seen unchanged for ``seconds`` by ``now`` already; one asked about again
        waits once more, which keeps more for a moment, never less."""
        self._since = {key: seen for key, seen in self._since.items() if now - seen[1] < seconds}
