"""Progress of a long pass, on a terminal only: one transient line below the log records.

When stderr is a terminal, ``logs`` writes the records through a ``TerminalLine`` (``current``),
which wipes the progress line before a record and draws it again after, so a record is never torn
and the progress never scrolls. When stderr is not a terminal there is no ``TerminalLine`` and no
progress at all: JSON logs stay one record per line, one line per event.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from typing import TextIO

_WIPE = "\r\x1b[K"  # back to the line's start, erase to its end


class TerminalLine:
    """A terminal stream with a status line kept below whatever else is written to it."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._status = ""
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        """Write ``text`` above the status line (which is drawn again once a line is complete)."""
        with self._lock:
            if self._status:
                self._stream.write(_WIPE)
            self._stream.write(text)
            if self._status and text.endswith("\n"):
                self._stream.write(self._status)
        return len(text)

    def flush(self) -> None:
        """Flush the terminal."""
        self._stream.flush()

    def isatty(self) -> bool:
        """It is a terminal."""
        return True

    def show(self, status: str) -> None:
        """Replace the status line with ``status`` (cut to the terminal's width: a wrapped line could
        not be wiped)."""
        width = max(10, shutil.get_terminal_size().columns - 1)
        with self._lock:
            self._status = status[:width]
            self._stream.write(_WIPE + self._status)
            self._stream.flush()

    def clear(self) -> None:
        """Remove the status line."""
        with self._lock:
            if self._status:
                self._stream.write(_WIPE)
                self._stream.flush()
                self._status = ""


current: TerminalLine | None = None  # set by logs.configure_logging when stderr is a terminal

PROGRESS_DELAY = 1.0  # a pass shorter than this shows no progress at all
PROGRESS_INTERVAL = 0.25  # at most this often a new figure


class PassProgress:
    """``reconciling: 1,234 of 5,000 directories (24%)`` while a pass takes longer than PROGRESS_DELAY;
    fed by the reconcile core after each directory (``update``), cleared at the pass's end."""

    def __init__(self, line: TerminalLine, clock: Callable[[], float] = time.monotonic) -> None:
        self._line = line
        self._clock = clock
        self._started: float | None = None
        self._done = 0
        self._next_draw = 0.0

    def update(self, done: int, total: int) -> None:
        """``done`` of the pass's ``total`` directories are planned."""
        now = self._clock()
        if self._started is None or done <= self._done:
            self._started, self._next_draw = now, 0.0  # a new pass
        self._done = done
        if done >= total:
            self.finish()
            return
        if now - self._started < PROGRESS_DELAY or now < self._next_draw:
            return
        self._next_draw = now + PROGRESS_INTERVAL
        self._line.show(f"reconciling: {done:,} of {total:,} directories ({done / total:.0%})")

    def finish(self) -> None:
        """The pass is over (or was interrupted): no progress line."""
        self._line.clear()
        self._started, self._done = None, 0
