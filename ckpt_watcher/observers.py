"""watchdog's observers, made safe for any tree: walks that never recurse, failures that never stop them.

watchdog walks the watched tree when it sets up inotify watches, when a directory appears or is moved
in, and at every poll, with ``os.walk`` (recursive on Python 3.11) or a recursive generator: a tree
about 1,000 levels deep raises RecursionError, and the daemon could never arm. Here every one of those
walks is ``walk_tree``, which keeps a list instead of a call stack, so depth costs memory in proportion
to the tree, never a frame per level. The polling observer also never follows a symlink (``lstat``:
``last.ckpt -> /`` is one entry, not the whole file system) and skips a subdirectory it cannot list
instead of failing the whole poll.

What an observer cannot watch is said once (``watch_incomplete``: a path longer than the kernel takes,
say) and left to the periodic rescan; a directory the inotify watch limit leaves out is reported to the
daemon, which polls it. An exception inside an observer's thread is logged and turned into a full
rescan (``report_lost_events_to``) instead of ending the thread and, with it, every event after.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, AnyStr

import structlog
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver, EventQueue, ObservedWatch
from watchdog.observers.polling import PollingEmitter
from watchdog.utils.dirsnapshot import DirectorySnapshot

from ckpt_watcher.logs import describe_os_error

logger = structlog.get_logger("ckpt_watcher.observers")

# Failures to list or watch a directory that need no word from the observer: the directory vanished
# (its parent's events say so), or it cannot be read at all (the scan reports it as scan_problem).
QUIET_ERRORS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM})

LostEventsCallback = Callable[[], None]


def walk_tree(
    top: AnyStr, *, follow_symlinks: bool = False, on_error: Callable[[AnyStr, OSError], None] | None = None
) -> Iterator[tuple[AnyStr, list[AnyStr], list[AnyStr]]]:
    """``os.walk(top)`` (top-down) without recursion, as Python 3.12's is: any depth.

    Like ``os.walk``, a symlink to a directory is listed in the directory names but not entered unless
    ``follow_symlinks``, and a caller may prune the directory names in place. A directory that cannot
    be listed is skipped (``on_error`` is told which and why).
    """
    pending = [top]
    while pending:
        directory = pending.pop()
        try:
            listing = _list(directory)
        except OSError as error:
            if on_error is not None:
                on_error(directory, error)
            continue
        directories, files, links = listing
        yield directory, directories, files
        for name in reversed(directories):
            if follow_symlinks or name not in links:
                pending.append(os.path.join(directory, name))


def _list(directory: AnyStr) -> tuple[list[AnyStr], list[AnyStr], set[AnyStr]]:
    """A directory's subdirectory names, other names, and which subdirectory names are symlinks."""
    directories: list[AnyStr] = []
    files: list[AnyStr] = []
    links: set[AnyStr] = set()
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                is_directory = entry.is_dir()
            except OSError:
                is_directory = False
            (directories if is_directory else files).append(entry.name)
            if is_directory and entry.is_symlink():
                links.add(entry.name)
    return directories, files, links


class UnwatchedOnce:
    """Says once per directory that an observer cannot cover it (``watch_incomplete``)."""

    def __init__(self, observer: str) -> None:
        self._observer = observer
        self._said: set[str] = set()
        self._lock = threading.Lock()

    def report(self, directory: bytes | str, error: OSError) -> None:
        """Warn about ``directory`` unless the error needs no word or it was said before."""
        if error.errno in QUIET_ERRORS:
            return
        path = os.fsdecode(directory)
        with self._lock:
            if path in self._said:
                return
            self._said.add(path)
        logger.warning(
            "watch_incomplete",
            subtree=path,
            observer=self._observer,
            error=describe_os_error(error),
            detail="not watched; the periodic rescan covers it",
        )


def report_thread_failure(where: str, lost_events: LostEventsCallback | None) -> None:
    """Log the exception being handled in an observer thread; ask for a full rescan (events were lost)."""
    logger.exception(
        "event_handler_failed", event_type=where, detail="events may be lost; rescanning everything"
    )
    if lost_events is not None:
        lost_events()


class _IterativeSnapshot(DirectorySnapshot):
    """watchdog's snapshot with its recursive walk replaced by an iterative one that skips (and
    reports) a subdirectory it cannot list; only the watched directory itself failing fails it."""

    def __init__(self, path: str, *, unwatched: UnwatchedOnce) -> None:
        self._unwatched = unwatched
        super().__init__(path, recursive=True, stat=os.lstat, listdir=os.scandir)

    def walk(self, root: str) -> Iterator[tuple[str, os.stat_result]]:
        pending = [root]
        while pending:
            directory = pending.pop()
            try:
                with os.scandir(directory) as entries:
                    paths = [os.path.join(directory, entry.name) for entry in entries]
            except OSError as error:
                if directory == root and error.errno not in {errno.ENOENT, errno.ENOTDIR, errno.EINVAL}:
                    raise  # as watchdog does: the poll is retried, or the root is reported deleted
                if directory != root:
                    self._unwatched.report(directory, error)
                continue
            subdirectories = []
            for path in paths:
                try:
                    status = os.lstat(path)
                except OSError as error:  # vanished since the listing (quietly), or too long a path
                    self._unwatched.report(path, error)
                    continue
                yield path, status
                if stat.S_ISDIR(status.st_mode):
                    subdirectories.append(path)
            pending.extend(reversed(subdirectories))


class DeepSafePollingEmitter(PollingEmitter):
    """watchdog's polling emitter on ``_IterativeSnapshot``; an exception in a poll is logged and
    turned into a full rescan, and the next poll goes on."""

    def __init__(self, event_queue: EventQueue, watch: ObservedWatch, **options: Any) -> None:
        super().__init__(event_queue, watch, **options)
        self.lost_events: LostEventsCallback | None = None
        unwatched = UnwatchedOnce("polling")
        self._take_snapshot = lambda: _IterativeSnapshot(os.fsdecode(self.watch.path), unwatched=unwatched)

    def queue_events(self, timeout: float) -> None:
        try:
            super().queue_events(timeout)
        except Exception:
            report_thread_failure("poll", self.lost_events)


class DeepSafePollingObserver(BaseObserver):
    """The polling observer on ``DeepSafePollingEmitter``."""

    def __init__(self, *, timeout: float = DEFAULT_OBSERVER_TIMEOUT) -> None:
        super().__init__(DeepSafePollingEmitter, timeout=timeout)
        self._lost_events: LostEventsCallback | None = None

    def report_lost_events_to(self, callback: LostEventsCallback | None) -> None:
        """``callback`` is called (from the emitter's thread) when a poll failed unexpectedly."""
        self._lost_events = callback
        for emitter in self.emitters:
            if isinstance(emitter, DeepSafePollingEmitter):
                emitter.lost_events = callback

    def schedule(self, event_handler: Any, path: Any, *, recursive: bool = False, **options: Any) -> Any:
        watch = super().schedule(event_handler, path, recursive=recursive, **options)
        self.report_lost_events_to(self._lost_events)
        return watch


def make_observer(poll_interval: float | None) -> Any:
    """The deep-safe polling observer with an interval, else (on Linux) the deep-safe inotify one."""
    if poll_interval is not None:
        return DeepSafePollingObserver(timeout=poll_interval)
    if sys.platform.startswith("linux"):
        from ckpt_watcher.inotify_observer import DeepSafeInotifyObserver  # noqa: PLC0415  (Linux only)

        return DeepSafeInotifyObserver()
    from watchdog.observers import Observer  # noqa: PLC0415  (another platform's native observer)

    return Observer()
