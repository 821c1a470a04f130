"""An observer the test drives: it records what the daemon schedules and delivers hand-built events.

It stands in for watchdog's observers (as watchfiles' tests stand in for the Rust notifier), so a
loop test decides exactly which events arrive and when, and nothing else does.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent


class ScriptedObserver:
    """Remembers each ``schedule`` call; ``deliver`` sends an event to every handler of a watched path."""

    def __init__(self, poll_interval: float | None = None) -> None:
        self.poll_interval = poll_interval
        self.scheduled: list[tuple[Any, str, bool]] = []
        self._alive = threading.Event()
        self._lock = threading.Lock()

    def schedule(self, event_handler: Any, path: str, *, recursive: bool = False) -> tuple[Any, str, bool]:
        watch = (event_handler, path, recursive)
        with self._lock:
            self.scheduled.append(watch)
        return watch

    def unschedule(self, watch: Any) -> None:
        with self._lock:
            self.scheduled.remove(watch)

    def start(self) -> None:
        self._alive.set()

    def stop(self) -> None:
        self._alive.clear()

    def join(self, timeout: float | None = None) -> None:
        return None

    def is_alive(self) -> bool:
        return self._alive.is_set()

    def deliver(self, event: FileSystemEvent) -> None:
        """Dispatch ``event`` as watchdog would: to the handler of each watch that covers its path (the
        watched directory's own, as ``EventsLostEvent``, too)."""
        path = Path(str(event.src_path or event.dest_path))
        with self._lock:
            handlers = [
                handler
                for handler, watched, recursive in self.scheduled
                if Path(watched) in (path, path.parent) or (recursive and Path(watched) in path.parents)
            ]
        for handler in handlers:
            handler.dispatch(event)


class ScriptedObservers:
    """An observer factory that keeps every observer it made (the daemon makes a new one on re-arm)."""

    def __init__(self) -> None:
        self.made: list[ScriptedObserver] = []

    def __call__(self, poll_interval: float | None) -> ScriptedObserver:
        observer = ScriptedObserver(poll_interval)
        self.made.append(observer)
        return observer

    @property
    def current(self) -> ScriptedObserver:
        """The observer made last."""
        return self.made[-1]
