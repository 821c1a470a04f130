"""The watched root while it is there: its lock, its identity, and the observer that reports on it.

The observer is inotify, or polling when inotify cannot be set up at all. A subdirectory inotify could
not watch (``fs.inotify.max_user_watches`` reached) is polled instead, by rescanning its subtree every
few seconds, until a watch for it fits again. The daemon holds one ``ArmedRoot`` or none: a root that
vanishes or is replaced is disarmed, and armed again once it is back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog

from ckpt_watcher.events import (
    EventRouter,
    Inbox,
    ObserverFactory,
    ObserverLike,
    OverflowListener,
    ReportsLostEvents,
    ReportsUnwatched,
    inotify_has_room,
    stop_observer,
)
from ckpt_watcher.filesystem import real_path
from ckpt_watcher.lock import DirectoryLock
from ckpt_watcher.logs import describe_os_error

logger = structlog.get_logger("ckpt_watcher.root")

FALLBACK_POLL_INTERVAL = 5.0
MAXIMUM_REWATCH_INTERVAL = 300.0
_LIMIT_ADVICE = "raise fs.inotify.max_user_watches / max_user_instances to avoid this"


def take_lock(root: Path) -> DirectoryLock:
    """The single-instance lock on ``root``: LockHeldError if another watcher has it, its subclass
    LockUnusableError if none can be taken (never a reason to run without one)."""
    lock = DirectoryLock(root)
    lock.acquire()
    return lock


def _describe(error: BaseException) -> str:
    """An OSError as its system message, anything else as its type and message."""
    if isinstance(error, OSError):
        return describe_os_error(error)
    return f"{type(error).__name__}: {error}"[:300]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


class ArmedRoot:
    """A root that exists and is being watched; made by ``arm``, ended by ``disarm``."""

    def __init__(
        self,
        given: Path,
        inbox: Inbox,
        lock: DirectoryLock | None,
        observer_factory: ObserverFactory,
        poll_interval: float | None,
    ) -> None:
        self.given = given
        self.path = real_path(given)
        self.identity = _identity(given)
        self.observer_kind = ""
        self._inbox = inbox
        self._lock = lock
        self._factory = observer_factory
        self._poll_interval = poll_interval
        self._observer: ObserverLike | None = None
        self._router: EventRouter | None = None
        self._root_watch: Any = None
        self._overflow = OverflowListener()
        self._config_files: frozenset[str] = frozenset()
        self._unwatched: set[Path] = set()
        self._next_poll = 0.0
        self._rewatch_interval = FALLBACK_POLL_INTERVAL
        self._next_rewatch = 0.0
        self._rescans_every: float | None = None  # no observer at all: rescan everything this often
        self._next_full_rescan = 0.0
        self._observer_retry_interval = FALLBACK_POLL_INTERVAL
        self._next_observer_try = 0.0

    @classmethod
    def arm(
        cls,
        given: Path,
        inbox: Inbox,
        *,
        lock: DirectoryLock | None,
        observer_factory: ObserverFactory,
        poll_interval: float | None,
        config_files: frozenset[str],
    ) -> ArmedRoot | None:
        """Lock and watch ``given`` if it is a directory now; None if it is not (yet)."""
        if not os.path.isdir(given) or _identity(given) is None:
            return None
        path = real_path(given)
        if lock is None or lock.directory != path or not lock.held:
            lock = take_lock(path)
        armed = cls(given, inbox, lock, observer_factory, poll_interval)
        try:
            armed.start_observer(config_files)
        except BaseException:
            armed.disarm()
            raise
        return armed

    @property
    def observer(self) -> ObserverLike | None:
        """The observer watching the root now."""
        return self._observer

    def still_there(self) -> bool:
        """True while the path as given is still the directory that was armed (not deleted, replaced
        or unmounted)."""
        return _identity(self.given) == self.identity

    def start_observer(self, config_files: frozenset[str]) -> None:
        """Watch the root (and the directories of the config files outside it): inotify, or polling
        with a warning when inotify cannot be set up. If no observer can be set up at all, the root
        is served by rescans instead (see ``_rescan_instead``): arming never fails for want of one."""
        self._config_files = config_files
        self._overflow.attach()  # (again, after a restart: attaching twice adds one handler)
        if self._poll_interval is None:
            try:
                self._watching(self._schedule(self._factory(None), polling=False), "inotify")
                return
            except Exception as error:  # any failure of the set-up: a watch limit, a walk
                if self._rescans_every is None:  # (not again at each retry without any observer)
                    logger.warning(
                        "inotify_unavailable",
                        subtree=str(self.path),
                        error=_describe(error),
                        detail=f"falling back to polling every {FALLBACK_POLL_INTERVAL:g} s "
                        f"({_LIMIT_ADVICE})",
                    )
            interval, kind = FALLBACK_POLL_INTERVAL, "polling every {:g} s (inotify unavailable)"
        else:
            interval, kind = self._poll_interval, "polling every {:g} s"
        try:
            self._watching(self._schedule(self._factory(interval), polling=True), kind.format(interval))
        except Exception as error:  # served by rescans instead
            self._rescan_instead(interval, error)

    def _watching(self, observer: ObserverLike, kind: str) -> None:
        self._observer = observer
        self.observer_kind = kind
        if self._rescans_every is not None:
            logger.info("watch_restored", subtree=str(self.path), observer=kind)
        self._rescans_every = None
        self._observer_retry_interval = FALLBACK_POLL_INTERVAL

    def _rescan_instead(self, interval: float, error: Exception) -> None:
        """No observer: the root is rescanned whole every ``interval`` seconds (``ensure_observer_alive``
        says when), and an observer is tried again after 5 s, 10 s, ... up to every 5 minutes."""
        if self._rescans_every is None:
            logger.warning(
                "watch_incomplete",
                subtree=str(self.path),
                observer="none",
                error=_describe(error),
                detail=f"no observer could be set up; rescanning everything every {interval:g} s "
                "until one can be",
            )
        self._observer = None
        self.observer_kind = f"none: rescanning every {interval:g} s"
        self._rescans_every = interval
        now = time.monotonic()
        self._next_full_rescan = now + interval
        self._next_observer_try = now + self._observer_retry_interval
        self._observer_retry_interval = min(2 * self._observer_retry_interval, MAXIMUM_REWATCH_INTERVAL)

    def _schedule(self, observer: ObserverLike, *, polling: bool) -> ObserverLike:
        router = EventRouter(self._inbox, polling=polling, config_files=self._config_files)
        try:
            self._root_watch = observer.schedule(router, str(self.path), recursive=True)
            if isinstance(observer, ReportsUnwatched):
                observer.report_unwatched_to(self._inbox.add_unwatched)
            if isinstance(observer, ReportsLostEvents):
                observer.report_lost_events_to(self._inbox.request_full_rescan)
            for directory in sorted({os.path.dirname(path) for path in self._config_files}):
                if not self._is_below(Path(directory)) and os.path.isdir(directory):
                    self._schedule_config_directory(observer, router, directory)
            observer.start()
        except BaseException:
            stop_observer(observer)
            raise
        self._router = router
        return observer

    @staticmethod
    def _schedule_config_directory(observer: ObserverLike, router: EventRouter, directory: str) -> None:
        try:
            observer.schedule(router, directory, recursive=False)
        except OSError as error:
            logger.warning(
                "config_watch_unavailable",
                path=directory,
                error=describe_os_error(error),
                detail="edits are still picked up by a check every second",
            )

    def _is_below(self, path: Path) -> bool:
        return path == self.path or self.path in path.parents

    def ensure_observer_alive(self, stopping: bool) -> bool:
        """Restart a dead observer thread; True if it had to be (events may have been lost). Without
        any observer, True whenever a rescan of everything is due (and now and then, try again)."""
        if stopping:
            return False
        if self._rescans_every is not None:
            now = time.monotonic()
            if now >= self._next_observer_try:
                self.start_observer(self._config_files)
                return True  # watched again (a rescan covers the gap), or not: a rescan is due anyway
            if now < self._next_full_rescan:
                return False
            self._next_full_rescan = now + self._rescans_every
            return True
        if self._observer is None or self._observer.is_alive():
            return False
        logger.warning("observer_restarted", observer=self.observer_kind, detail="the observer thread died")
        stop_observer(self._observer)
        self._observer = None
        self.start_observer(self._config_files)
        return True

    def note_unwatched(self, directories: Iterable[str]) -> None:
        """Directories inotify failed to watch: each subtree is polled from now on (warned once)."""
        for directory in sorted(Path(os.path.normpath(path)) for path in directories):
            if directory == self.path or not self._is_below(directory):
                continue  # the root itself (polled whole already) or a config directory (checked anyway)
            if directory in self._unwatched or any(parent in self._unwatched for parent in directory.parents):
                continue
            self._unwatched.add(directory)
            logger.warning(
                "inotify_unavailable",
                subtree=str(directory),
                error="inotify watch limit reached",
                detail=f"polling this subtree every {FALLBACK_POLL_INTERVAL:g} s until it can be "
                f"watched again ({_LIMIT_ADVICE})",
            )

    def subtrees_to_poll(self, now: float) -> set[Path]:
        """The unwatched subtrees, when their poll is due (else nothing); retries inotify for them."""
        if not self._unwatched or now < self._next_poll:
            return set()
        self._next_poll = now + FALLBACK_POLL_INTERVAL
        unwatched = {directory for directory in self._unwatched if os.path.isdir(directory)}
        # the top-most only: a subtree reported before its parent is polled with the parent
        self._unwatched = {
            directory
            for directory in unwatched
            if not any(parent in unwatched for parent in directory.parents)
        }
        due = set(self._unwatched)
        if due and now >= self._next_rewatch and self._try_rewatch():
            # watching the root again walks it whole: if the limit is hit again at once, wait longer
            self._next_rewatch = now + self._rewatch_interval
            self._rewatch_interval = min(self._rewatch_interval * 2, MAXIMUM_REWATCH_INTERVAL)
        return due

    def _try_rewatch(self) -> bool:
        """If a watch fits for every unwatched subtree now, watch the root again from scratch (a
        directory that still does not fit is reported again; if the root does not fit, it is set up
        as at the start) and rescan: events of the gap are lost. True if it did."""
        observer = self._observer
        if observer is None or self._router is None or not inotify_has_room(self._unwatched):
            return False
        observer.unschedule(self._root_watch)
        try:
            self._root_watch = observer.schedule(self._router, str(self.path), recursive=True)
        except Exception:  # the tree grew past the room checked: set up as at the start (maybe polling)
            stop_observer(observer)
            self._observer = self._root_watch = None
            self.start_observer(self._config_files)
        else:
            for directory in sorted(self._unwatched):
                logger.info(
                    "inotify_restored", subtree=str(directory), detail="watched again; no longer polled"
                )
        self._unwatched.clear()
        self._inbox.request_full_rescan()
        return True

    def next_deadline(self) -> float | None:
        """When the next subtree poll is due, or None while every directory is watched."""
        return self._next_poll if self._unwatched else None

    def disarm(self) -> None:
        """Stop watching and release the lock (the lock file stays, harmlessly)."""
        self._overflow.detach()
        if self._observer is not None:
            stop_observer(self._observer)
            self._observer = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None
