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
import math
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, AnyStr

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver, EventQueue, ObservedWatch
from watchdog.observers.polling import PollingEmitter

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


_MASK = (1 << 64) - 1
# The coarsest timestamp a file system this may poll keeps (FAT: 2 s; ext3, HFS+, some NFS servers: 1 s).
TIMESTAMP_TICK = 2.0
# A directory a poll may skip is still listed in full at least this often (LeanTree.skips_allowed).
FULL_LISTING_SECONDS = 60.0
DEFAULT_POLL_INTERVAL = 15.0  # for a LeanTree made without one (the tests): as watch --poll 15


class LeanTree:
    """What a poll remembers of the tree: per directory, each entry's name and one integer (its inode
    in the high 64 bits, a hash of its size, mtime, mode and owner in the low ones, less the lowest:
    a directory or not). About 120 bytes an entry, where watchdog's ``DirectorySnapshot`` keeps a full
    path, a ``stat_result`` and an inode index per entry, twice while two snapshots are compared.

    Not ``recursive`` (a config file's directory), only the root's own entries are listed, as
    watchdog's non-recursive snapshot does: its subdirectories are entries, never walked.

    A recursive tree skips what cannot have changed: creating, deleting or renaming an entry changes
    its directory's mtime and ctime, so a directory whose own signature (inode, device, mtime, ctime;
    ``_DirectoryState``) is unchanged is not listed again, nor is each of its entries stat'ed. Only
    its subdirectories (entries too, and walked) and its *active* entries (those that appeared or
    changed at the previous poll) are: a checkpoint written in place keeps giving "modified" at every
    poll until it has been quiet for a whole poll.

    A signature is trusted only once the directory has been listed in full after the signature
    stopped changing, at a poll at least a timestamp tick after the first that saw it: a change in the
    same tick as the one that set it leaves it equal, but a change after that full listing is at least
    a tick later, so it changes the timestamp. With polls ``TIMESTAMP_TICK`` (2 s, FAT's tick; 1 s on
    ext3, HFS+ and some NFS servers) or more apart, that is two polls in a row finding it the same;
    with shorter intervals (``poll_interval``), as many more as span the tick. No timestamp is compared
    with our clock (an NFS server's may differ): only the number of polls counts.

    Every directory is still listed in full at least every ``FULL_LISTING_SECONDS`` (60 s): on a file
    system whose directory timestamps do not follow the listing (some FUSE mounts), a new checkpoint
    is then seen within a minute, not only at the daemon's periodic rescan.

    What this does not see at once: a file written (or chmod'ed) in place after it was quiet for a
    whole poll, in a directory where nothing was created, deleted or renamed since, is seen at the
    next change of that directory, its next full listing, or the daemon's periodic rescan, which
    stats everything. Events are hints: no decision is made without a pass that stats the file. A
    non-recursive tree (the policy file's directory: an in-place edit must hot-reload at the next
    poll) is listed in full at every poll.
    """

    def __init__(
        self,
        root: str,
        unwatched: UnwatchedOnce,
        *,
        recursive: bool = True,
        poll_interval: float | None = None,
    ) -> None:
        self.root = root
        self.recursive = recursive
        # Polls that must find a signature unchanged before the next may trust it: spanning at least a
        # timestamp tick (one, when the polls are that far apart; without an interval, they are).
        self.trusted_after = 1 if poll_interval is None else max(1, math.ceil(TIMESTAMP_TICK / poll_interval))
        # Polls in a row that may skip a directory before one lists it in full again: on a file system
        # whose directory timestamps do not follow their listing (some FUSE mounts), a new checkpoint
        # is then seen within FULL_LISTING_SECONDS, not only at the next --rescan.
        interval = poll_interval if poll_interval is not None else DEFAULT_POLL_INTERVAL
        self.skips_allowed = max(0, math.ceil(FULL_LISTING_SECONDS / interval) - 1)
        self._unwatched = unwatched
        self.directories: dict[str, dict[str, int]] = {}
        self._states: dict[str, _DirectoryState] = {}

    def poll(self, emit: Callable[[FileSystemEvent], None] | None) -> None:
        """Walk the tree (iteratively; never through a symlink) and replace what is remembered; with
        ``emit``, say what changed since the last walk, as the events watchdog's diff would give."""
        previous = self.directories
        previous_states = self._states
        current: dict[str, dict[str, int]] = {}
        states: dict[str, _DirectoryState] = {}
        changes = _Changes()
        pending = [self.root]
        while pending:
            directory = pending.pop()
            before = previous.get(directory)
            listed = self._list(directory, before, previous_states.get(directory))
            if listed is None:
                continue
            entries, subdirectories, state, restated = listed
            previous.pop(directory, None)
            current[directory] = entries
            states[directory] = state
            if emit is not None and restated is not None:  # skipped: only what was stat'ed can differ
                changes.compare(directory, *restated)
            elif emit is not None and entries != (before or {}):
                changes.compare(directory, before or {}, entries)
            if self.recursive:
                pending.extend(os.path.join(directory, name) for name in subdirectories)
        if emit is not None:
            for directory, entries in previous.items():  # vanished with their parent
                changes.compare(directory, entries, {})
            changes.emit(emit)
        self.directories = current
        self._states = states

    def _list(
        self, directory: str, before: dict[str, int] | None, state: _DirectoryState | None
    ) -> tuple[dict[str, int], list[str], _DirectoryState, _Restated | None] | None:
        """The directory's entries, the names of its subdirectories, its new state and, if its listing
        was skipped, what the entries stat'ed were and are (never a symlink: below the root, a directory
        swapped for a symlink since its parent was listed is not opened)."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            descriptor = os.open(directory, flags if directory == self.root else flags | os.O_NOFOLLOW)
        except OSError as error:
            if directory == self.root and error.errno not in {errno.ENOENT, errno.ENOTDIR, errno.EINVAL}:
                raise  # as watchdog does: the poll is retried, or the root is reported deleted
            if directory == self.root:
                raise FileNotFoundError(error.errno, error.strerror, directory) from None
            if error.errno != errno.ELOOP:  # a symlink now: not entered, and its parent's entry says so
                self._unwatched.report(directory, error)
            return None
        try:
            signature = _directory_signature(descriptor)  # before the listing: a later change shows next poll
            if (
                self.recursive
                and before is not None
                and state is not None
                and state.signature == signature
                and state.unchanged >= self.trusted_after
                and state.skipped < self.skips_allowed
            ):
                state.skipped += 1
                entries, state.subdirectories, state.active, restated = self._restat(
                    directory, descriptor, before, state
                )
                return entries, state.subdirectories, state, restated
            entries, subdirectories = self._entries(directory, descriptor)
        except OSError as error:  # the listing itself failed (EIO, ...)
            if directory == self.root:
                raise
            self._unwatched.report(directory, error)
            return None
        finally:
            os.close(descriptor)
        unchanged = state.unchanged + 1 if state is not None and state.signature == signature else 0
        # The active entries matter only to a poll that skips the listing: the next one, if this one
        # brought the count of polls that found the signature unchanged to what is needed.
        if not self.recursive or unchanged < self.trusted_after or before is None or entries == before:
            active = _NONE
        else:
            active = frozenset(name for name, value in entries.items() if before.get(name) != value)
        return entries, subdirectories, _DirectoryState(signature, unchanged, active, subdirectories), None

    def _entries(self, directory: str, descriptor: int) -> tuple[dict[str, int], list[str]]:
        """Each entry's name and integer; the subdirectories' names. Names, then one ``lstat`` each
        relative to the open directory: no ``DirEntry`` per entry, no full path to resolve."""
        entries: dict[str, int] = {}
        subdirectories: list[str] = []
        status_of = os.stat
        # Names interned, as the daemon's scan interns them: a name is then one string for what is
        # remembered, the next listing and the records of a pass (with the scan's interning, the
        # --poll 15 start-up peak on 100,000 files went from 133 to 127 MB).
        intern = sys.intern
        for name in os.listdir(descriptor):
            name = intern(name)  # noqa: PLW2901
            try:
                status = status_of(name, dir_fd=descriptor, follow_symlinks=False)
            except OSError as error:  # vanished since the listing (quietly), or cannot be read
                self._unwatched.report(os.path.join(directory, name), error)
                continue
            # _entry_value, spelled out: a call per entry is a tenth of a full listing's CPU
            mode = status.st_mode
            signature = hash((status.st_size, status.st_mtime_ns, mode, status.st_uid, status.st_gid)) << 1
            if stat.S_ISDIR(mode):
                subdirectories.append(name)
                entries[name] = (status.st_ino << 64) | (signature & _MASK) | 1
            else:
                entries[name] = (status.st_ino << 64) | (signature & _MASK)
        return entries, subdirectories

    def _restat(
        self, directory: str, descriptor: int, entries: dict[str, int], state: _DirectoryState
    ) -> tuple[dict[str, int], list[str], frozenset[str], _Restated]:
        """A directory whose listing cannot have changed: ``lstat`` only its active entries and its
        subdirectories, and update ``entries`` (remembered; changed in place) with what they say.
        Returns the entries, the subdirectories' names, the entries still active (changed now), and
        what changed as ``_Changes.compare`` takes it (before, after; the stat'ed names only)."""
        names = list(state.subdirectories)
        names.extend(name for name in state.active if name in entries and not entries[name] & 1)
        then: dict[str, int] = {}
        now: dict[str, int] = {}
        status_of = os.stat
        for name in names:
            old = entries[name]
            try:
                status = status_of(name, dir_fd=descriptor, follow_symlinks=False)
            except OSError as error:  # gone (its directory changed: the next poll lists it), or unreadable
                self._unwatched.report(os.path.join(directory, name), error)
                then[name] = old
                del entries[name]
                continue
            value = _entry_value(status)
            if value != old:
                then[name] = old
                now[name] = value
                entries[name] = value
        subdirectories = [name for name in names if entries.get(name, 0) & 1]
        return entries, subdirectories, frozenset(now), (then, now)


_NONE: frozenset[str] = frozenset()
_Restated = tuple[dict[str, int], dict[str, int]]  # a skipped directory's stat'ed entries: then, now


def _directory_signature(descriptor: int) -> tuple[int, int, int, int]:
    """What changes when an entry is created, deleted or renamed in the open directory: its identity
    (inode, device) and its mtime and ctime (a seam for the tests: a timestamp tick cannot be forced)."""
    status = os.fstat(descriptor)
    return status.st_ino, status.st_dev, status.st_mtime_ns, status.st_ctime_ns


def _entry_value(status: os.stat_result) -> int:
    """An entry's integer: inode in the high 64 bits, a hash of size, mtime, mode and owner in the low
    ones, the lowest bit set for a directory (``LeanTree._entries`` spells it out in its loop)."""
    mode = status.st_mode
    signature = hash((status.st_size, status.st_mtime_ns, mode, status.st_uid, status.st_gid)) << 1
    return (status.st_ino << 64) | (signature & _MASK) | (1 if stat.S_ISDIR(mode) else 0)


class _DirectoryState:
    """Per directory, what decides whether the next poll may skip listing it: its signature when last
    polled, how many polls in a row had found it unchanged before (``unchanged``; counted up to what
    ``LeanTree.trusted_after`` needs), its active entries (those that appeared or changed at that
    poll: stat'ed at the next one even if it is skipped) and the names of its subdirectories (stat'ed
    at every poll)."""

    __slots__ = ("active", "signature", "skipped", "subdirectories", "unchanged")

    def __init__(
        self,
        signature: tuple[int, int, int, int],
        unchanged: int,
        active: frozenset[str],
        subdirectories: list[str],
    ) -> None:
        self.signature = signature
        self.unchanged = unchanged
        self.active = active
        self.subdirectories = subdirectories
        self.skipped = 0  # polls in a row that skipped it since it was last listed in full


class _Changes:
    """The differences found by one poll, turned into watchdog events (moves matched by identity)."""

    def __init__(self) -> None:
        self.created: dict[int, list[tuple[str, bool]]] = {}
        self.deleted: dict[int, list[tuple[str, bool]]] = {}
        self.modified: list[tuple[str, bool]] = []

    def compare(self, directory: str, before: dict[str, int], after: dict[str, int]) -> None:
        """Note what differs between a directory's entries then (``before``) and now (``after``)."""
        for name, value in after.items():
            old = before.get(name)
            if old == value:
                continue
            path = os.path.join(directory, name)
            if old is None or old >> 64 != value >> 64 or (old ^ value) & 1:
                if old is not None:
                    self.deleted.setdefault(old >> 64, []).append((path, bool(old & 1)))
                self.created.setdefault(value >> 64, []).append((path, bool(value & 1)))
            else:
                self.modified.append((path, bool(value & 1)))
        for name, value in before.items():
            if name not in after:
                path = os.path.join(directory, name)
                self.deleted.setdefault(value >> 64, []).append((path, bool(value & 1)))

    def emit(self, emit: Callable[[FileSystemEvent], None]) -> None:
        """Deletions, modifications, creations, then moves (a deletion and a creation of one identity)."""
        moved: list[tuple[str, str, bool]] = []
        for identity, gone in list(self.deleted.items()):
            arrived = self.created.get(identity)
            while gone and arrived:
                (source, is_directory), (destination, _) = gone.pop(), arrived.pop()
                moved.append((source, destination, is_directory))
        for path, is_directory in [item for items in self.deleted.values() for item in items]:
            emit(DirDeletedEvent(path) if is_directory else FileDeletedEvent(path))
        for path, is_directory in self.modified:
            emit(DirModifiedEvent(path) if is_directory else FileModifiedEvent(path))
        for path, is_directory in [item for items in self.created.values() for item in items]:
            emit(DirCreatedEvent(path) if is_directory else FileCreatedEvent(path))
        for source, destination, is_directory in moved:
            emit(DirMovedEvent(source, destination) if is_directory else FileMovedEvent(source, destination))


class DeepSafePollingEmitter(PollingEmitter):
    """A polling emitter on ``LeanTree`` (what a poll remembers, lean; iterative walks; never through a
    symlink); an exception in a poll is logged and turned into a full rescan, and the next poll goes on."""

    def __init__(self, event_queue: EventQueue, watch: ObservedWatch, **options: Any) -> None:
        super().__init__(event_queue, watch, **options)
        self.lost_events: LostEventsCallback | None = None
        self._tree = LeanTree(
            os.fsdecode(self.watch.path),
            UnwatchedOnce("polling"),
            recursive=self.watch.is_recursive,
            poll_interval=self.timeout,
        )
        self._failing = False

    def on_thread_start(self) -> None:
        try:
            self._tree.poll(None)
        except OSError:
            self._failing = True  # the first poll that can read it reports what it finds
        except Exception:
            report_thread_failure("poll", self.lost_events)

    def queue_events(self, timeout: float) -> None:
        try:
            self._queue_events(timeout)
        except Exception:
            report_thread_failure("poll", self.lost_events)

    def _queue_events(self, timeout: float) -> None:
        if self.stopped_event.wait(timeout):
            return
        with self._lock:
            if not self.should_keep_running():
                return
            try:
                self._tree.poll(self.queue_event)
            except (FileNotFoundError, NotADirectoryError):
                self.queue_event(DirDeletedEvent(self.watch.path))
                self.stop()
                return
            except OSError as error:  # temporary (EIO, ESTALE, ...): what is remembered stays
                if not self._failing:
                    self._failing = True
                    logger.warning(
                        "watch_incomplete",
                        subtree=self._tree.root,
                        observer="polling",
                        error=describe_os_error(error),
                        detail="cannot poll now; retried at the next poll",
                    )
                return
            self._failing = False


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
