"""The watcher's clock (``clocks.watcher_clock``), moved by hand: a changed config is read, and a
directory checkpoint counts, only once the daemon has seen it unchanged for its quiet time."""

from __future__ import annotations

from ckpt_watcher.config_files import CONFIG_QUIET_SECONDS


class QuietClock:
    """Stands in for ``clocks.watcher_clock``; ``pass_quiet_time`` moves it past a config's quiet time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def pass_quiet_time(self, seconds: float = CONFIG_QUIET_SECONDS) -> None:
        """Move on by a little more than ``seconds`` (a config's quiet time unless told)."""
        self.now += seconds + 0.1
