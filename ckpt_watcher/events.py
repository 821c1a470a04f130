"""Watchdog in, paths out: the event handler, the inbox the worker takes batches from, the observers.

Handlers run on watchdog's threads and only put paths into the ``Inbox``; the one worker takes them
in batches. Nothing here knows about groups, policies or plans. The observers themselves (watchdog's,
made safe for trees of any depth) are in ``observers`` and ``inotify_observer``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog
from watchdog.events import EVENT_TYPE_EVENTS_LOST, FileSystemEvent, FileSystemEventHandler

from ckpt_watcher.observers import make_observer
from ckpt_watcher.overrides import OVERRIDE_FILE_NAME

logger = structlog.get_logger("ckpt_watcher.events")

QUIET_WINDOW = 0.02
MAXIMUM_BATCH_DELAY = 0.25


@dataclass
class Batch:
    """What arrived since the worker last looked.

    ``files`` changed (``closed``: their writer closed them or they were moved into place), ``trees``
    appeared, moved or vanished, ``unwatched`` are directories inotify could not watch.
    """

    files: set[str] = field(default_factory=set)
    closed: set[str] = field(default_factory=set)
    trees: set[str] = field(default_factory=set)
    unwatched: set[str] = field(default_factory=set)
    full_rescan: bool = False
    reload: bool = False
    forced_reload: bool = False

    def __bool__(self) -> bool:
        return bool(self.files or self.trees or self.unwatched or self.full_rescan or self.reload)


class Inbox:
    """The hand-off between event handlers (which only add) and the one worker (which takes)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._batch = Batch()
        self._woken = False

    def add_file(self, path: str, *, closed: bool = False) -> None:
        """A file changed; ``closed`` means its writer closed it or it was moved into place."""
        with self._condition:
            self._batch.files.add(path)
            if closed:
                self._batch.closed.add(path)
            self._condition.notify()

    def add_tree(self, path: str) -> None:
        """A directory appeared, moved or vanished: rescan everything below it."""
        with self._condition:
            self._batch.trees.add(path)
            self._condition.notify()

    def add_unwatched(self, path: str) -> None:
        """inotify could not watch this directory (its watch limit is reached): poll it instead."""
        with self._condition:
            self._batch.unwatched.add(path)
            self._condition.notify()

    def request_full_rescan(self) -> None:
        """Events were lost (queue overflow) or the policy changed: rescan the whole root."""
        with self._condition:
            self._batch.full_rescan = True
            self._condition.notify()

    def request_reload(self, *, forced: bool = False) -> None:
        """Check the policy and protect_from files; ``forced`` (SIGHUP) re-reads even if unchanged."""
        with self._condition:
            self._batch.reload = True
            self._batch.forced_reload = self._batch.forced_reload or forced
            self._condition.notify()

    def wake(self) -> None:
        """Make ``take`` return now (used on stop)."""
        with self._condition:
            self._woken = True
            self._condition.notify()

    def take(self, timeout: float) -> Batch:
        """Wait up to ``timeout`` for work, then gather a burst until it goes quiet; return it."""
        with self._condition:
            if not self._batch and not self._woken:
                self._condition.wait(timeout)
            if self._batch and not self._woken:
                deadline = time.monotonic() + MAXIMUM_BATCH_DELAY
                while not self._woken:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._condition.wait(min(QUIET_WINDOW, remaining)):
                        break
            batch, self._batch, self._woken = self._batch, Batch(), False
            return batch


class EventRouter(FileSystemEventHandler):
    """The watchdog handler: classifies an event into the inbox and does nothing else."""

    def __init__(self, inbox: Inbox, *, polling: bool, config_files: frozenset[str]) -> None:
        super().__init__()
        self._inbox = inbox
        self._polling = polling
        self._config_files = config_files
        self._config_directories = frozenset(os.path.dirname(path) for path in config_files)

    def dispatch(self, event: FileSystemEvent) -> None:
        """Route every event; an exception here is logged and never reaches the observer."""
        try:
            if event.event_type == EVENT_TYPE_EVENTS_LOST:
                # After an inotify overflow, once the watches are mended: a rescan that starts now
                # misses nothing written after it (the overflow's log record only says it).
                self._inbox.request_full_rescan()
            else:
                self._route(event)
        except Exception:
            logger.exception("event_handler_failed", event_type=event.event_type)

    def _is_config_change(self, path: str) -> bool:
        """The policy or a protect_from file itself, or a ConfigMap's ``..data`` symlink beside one."""
        if path in self._config_files:
            return True
        return os.path.basename(path) == "..data" and os.path.dirname(path) in self._config_directories

    def _route(self, event: FileSystemEvent) -> None:
        if event.event_type in {"opened", "closed_no_write"}:
            return  # reads, including our own completeness checks
        source = os.fsdecode(event.src_path)
        destination = os.fsdecode(event.dest_path) if event.dest_path else ""
        paths = [path for path in (source, destination) if path]
        if any(self._is_config_change(path) for path in paths):
            self._inbox.request_reload()  # re-read if the file's identity changed
        if any(os.path.basename(path) == OVERRIDE_FILE_NAME for path in paths):
            for path in paths:
                self._inbox.add_tree(os.path.dirname(path))  # a per-run policy: re-plan its subtree
        elif event.is_directory:
            if event.event_type != "modified":  # a listing change; the files' own events say what changed
                for path in paths:
                    self._inbox.add_tree(path)
        elif event.event_type == "moved":
            self._route_move(source, destination)
        elif event.event_type != "modified" or self._polling:
            # inotify's "modified" is a write in progress: its close (or move into place) is what counts
            self._inbox.add_file(source, closed=event.event_type == "closed")

    def _route_move(self, source: str, destination: str) -> None:
        """Either side may be empty: moved in from outside the tree, or out of it. A rename is atomic,
        so what arrives is as complete as it will ever be (the zip check still applies)."""
        if source:
            self._inbox.add_file(source)
        if destination:
            self._inbox.add_file(destination, closed=True)


class OverflowListener(logging.Handler):
    """watchdog says an inotify queue overflow only in a log record: said here once, as the daemon's
    own ``event_queue_overflow``. The full rescan is asked by the ``EventsLostEvent`` watchdog queues
    once the watches are mended (``EventRouter``): one asked now would start before they are, and on
    a large tree run twice."""

    _WATCHDOG_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            logger.warning("event_queue_overflow", detail="events were lost; rescanning everything")

    def attach(self) -> None:
        """Listen to watchdog's inotify loggers."""
        for name in self._WATCHDOG_LOGGERS:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        """Stop listening."""
        for name in self._WATCHDOG_LOGGERS:
            logging.getLogger(name).removeHandler(self)


class ObserverLike(Protocol):
    """The parts of a watchdog observer the daemon uses."""

    def schedule(self, event_handler: Any, path: str, *, recursive: bool = False) -> Any: ...
    def unschedule(self, watch: Any) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...
    def is_alive(self) -> bool: ...


@runtime_checkable
class ReportsUnwatched(Protocol):
    """An observer that says which directories it failed to watch (the inotify watch limit)."""

    def report_unwatched_to(self, callback: Callable[[str], None] | None) -> None: ...


@runtime_checkable
class ReportsLostEvents(Protocol):
    """An observer that says when a failure inside it may have lost events (a full rescan is due)."""

    def report_lost_events_to(self, callback: Callable[[], None] | None) -> None: ...


ObserverFactory = Callable[[float | None], ObserverLike]


def default_observer_factory(poll_interval: float | None) -> ObserverLike:
    """inotify, or with an interval the polling observer; both safe on a tree of any depth (see
    ``observers`` and ``inotify_observer``)."""
    observer: ObserverLike = make_observer(poll_interval)
    return observer


def stop_observer(observer: ObserverLike) -> None:
    """Stop an observer and wait a little for its thread; a failure is logged, never raised."""
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=1.0)
    except Exception:
        logger.exception("observer_stop_failed")


_IN_CREATE = 0x100


def inotify_has_room(directories: Iterable[Path]) -> bool:
    """True if a watch could be added for every one of ``directories`` now (a throw-away instance)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    descriptor = libc.inotify_init1(os.O_CLOEXEC)
    if descriptor < 0:
        return False
    try:
        return all(
            libc.inotify_add_watch(descriptor, os.fsencode(directory), _IN_CREATE) >= 0
            for directory in directories
        )
    finally:
        os.close(descriptor)  # removes every watch it holds
