"""The watched root while it is there: its lock, its identity, and the observer that reports on it.

The observer is inotify, or polling when inotify cannot be set up at all. A subdirectory inotify could
not watch (``fs.inotify.max_user_watches`` reached) is polled instead, by rescanning its subtree every
few seconds, until a watch for it fits again. The daemon holds one ``ArmedRoot`` or none: a root that
vanishes or is replaced is disarmed, and armed again once it is back.
"""

from __future__ import annotations

import os
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
        self._overflow = OverflowListener(inbox)
        self._config_files: frozenset[str] = frozenset()
        self._unwatched: set[Path] = set()
        self._next_poll = 0.0
        self._rewatch_interval = FALLBACK_POLL_INTERVAL
        self._next_rewatch = 0.0

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
        with a warning when inotify cannot be set up."""
        self._config_files = config_files
        polling = self._poll_interval is not None
        try:
            self._observer = self._schedule(self._factory(self._poll_interval), polling=polling)
            self.observer_kind = f"polling every {self._poll_interval:g} s" if polling else "inotify"
        except OSError as error:
            if polling:
                raise
            logger.warning(
                "inotify_unavailable",
                subtree=str(self.path),
                error=describe_os_error(error),
                detail=f"falling back to polling every {FALLBACK_POLL_INTERVAL:g} s ({_LIMIT_ADVICE})",
            )
            self._observer = self._schedule(self._factory(FALLBACK_POLL_INTERVAL), polling=True)
            self.observer_kind = f"polling every {FALLBACK_POLL_INTERVAL:g} s (inotify unavailable)"
        self._overflow.attach()

    def _schedule(self, observer: ObserverLike, *, polling: bool) -> ObserverLike:
        router = EventRouter(self._inbox, polling=polling, config_files=self._config_files)
        try:
            self._root_watch = observer.schedule(router, str(self.path), recursive=True)
            if isinstance(observer, ReportsUnwatched):
                observer.report_unwatched_to(self._inbox.add_unwatched)
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
        """Restart a dead observer thread; True if it had to be (events may have been lost)."""
        if self._observer is None or self._observer.is_alive() or stopping:
            return False
        logger.warning("observer_restarted", observer=self.observer_kind, detail="the observer thread died")
        self._overflow.detach()
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
        directory that still does not fit is reported again) and rescan: events of the gap are lost.
        True if it did."""
        observer = self._observer
        if observer is None or self._router is None or not inotify_has_room(self._unwatched):
            return False
        observer.unschedule(self._root_watch)
        self._root_watch = observer.schedule(self._router, str(self.path), recursive=True)
        for directory in sorted(self._unwatched):
            logger.info("inotify_restored", subtree=str(directory), detail="watched again; no longer polled")
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
