"""The clock this process measures what it has seen on: its own monotonic clock, never a file's time.

A file's time is its writer's clock, which may be behind (another host on NFS or Lustre), and this
machine's wall clock may step; neither moves ``time.monotonic``. So "left alone for the quiet time" is
judged, where a wrong yes would lose a checkpoint, by what this process saw unchanged for that long.
One function, so a test can drive it.
"""

from __future__ import annotations

import time


def watcher_clock() -> float:
    """Seconds on this process's monotonic clock."""
    return time.monotonic()
