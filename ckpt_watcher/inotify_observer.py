"""The inotify observer the daemon uses (Linux): lean, deep-safe, and telling which directories it missed.

* Lean: only the events the router acts on are asked of the kernel (no opens, reads, modifications or
  attribute changes: the start-up reconcile opens every checkpoint, and a multi-GB write is thousands of
  IN_MODIFY), and full move events: a file renamed in from outside the tree (Lightning's atomic save)
  is a move with no source, so it counts at once rather than after the settle time.
* Deep-safe: watchdog's walks of the tree (adding the watches of a tree, the contents of a directory
  that appeared) are ``walk_tree``, which never recurses. For a directory moved within or into the tree,
  watchdog would walk it to make up an event for every entry inside; the router rescans a moved tree
  itself, so only the move is reported.
* Telling: a subdirectory watchdog could not watch is otherwise skipped silently. One left out by the
  watch limit (``fs.inotify.max_user_watches``) is reported to the daemon, which polls it; one that
  cannot be watched at all (a path longer than PATH_MAX) is named in a ``watch_incomplete`` warning and
  left to the rescan. An exception while handling an event is logged and asks for a full rescan
  instead of ending the thread that reads every event.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
)
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
from watchdog.observers.inotify import DirNode, InotifyFullEmitter, InotifyObserver, InotifyWatchGroup
from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    Watch,
    WatchCallback,
    WatchDescriptor,
    inotify_add_watch,
)
from watchdog.observers.inotify_move_event_grouper import GroupedInotifyEvent, PathedInotifyEvent

from ckpt_watcher.observers import LostEventsCallback, UnwatchedOnce, report_thread_failure, walk_tree
from ckpt_watcher.records import TRASH_DIRECTORY_NAME

# What the router uses from inotify (see the module docstring).
INOTIFY_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,  # (after an overflow: a full rescan, once the watches are mended)
]
_CREATED_DIRECTORY = Mask(InotifyConstants.IN_CREATE | InotifyConstants.IN_ISDIR)


class ReportingInotifyFD(InotifyFD):
    """An inotify instance that reports the watches it could not add and survives its callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.unwatched: Callable[[str], None] | None = None
        self.lost_events: LostEventsCallback | None = None
        self._unwatchable = UnwatchedOnce("inotify")

    def rejoin(self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId) -> WatchDescriptor:
        """How ``DeepSafeWatchGroup`` adds every watch (watchdog's ``add_callback`` is not used). One the
        group may hold already (a directory its overflow walk watched, whose creation is then
        replayed) is joined: the kernel returns the same watch descriptor and queues nothing, and a
        callback already on it stays, without watchdog's warning that it was overwritten. Failures
        are raised, not reported: the group says which need saying (``report_unwatched``)."""
        with self._lock:
            wd = inotify_add_watch(self._inotify_fd, path, mask)
            if wd == -1:
                error_number = ctypes.get_errno()
                raise OSError(error_number, os.strerror(error_number), os.fsdecode(path))
            watch = self._watch_for_wd.setdefault(wd, Watch(wd, mask, path))
            watch.callbacks[id_] = callback
            return wd

    def report_unwatched(self, path: bytes, error: OSError) -> None:
        """Say that ``path`` could not be watched: left out by the watch limit, to the daemon (which
        polls it); anything else in a ``watch_incomplete`` warning, unless it needs no word."""
        if error.errno == errno.ENOSPC:
            if self.unwatched is not None:
                self.unwatched(os.fsdecode(path))  # polled by the daemon until a watch fits
        else:
            self._unwatchable.report(path, error)

    def handle_event(self, event: InotifyEvent) -> None:
        try:
            super().handle_event(event)
        except Exception:
            report_thread_failure("inotify", self.lost_events)


_TRASH = os.fsencode(TRASH_DIRECTORY_NAME)
_INVALID_WD = WatchDescriptor(-1)  # (a node on the way to a watched one, not watched itself)
_LIMITS = frozenset({errno.ENOSPC, errno.EMFILE})  # the watch and instance limits
_UNLISTED_SWEEP = 64  # unlisted directories remembered before those deleted since are dropped


class DeepSafeWatchGroup(InotifyWatchGroup):
    """watchdog's watch group with its two walks of the tree made iterative (same results), no watch
    in a trash (``.ckpt-trash``): nothing there is ever planned, and a trash of directory checkpoints
    would take a watch per directory in them from the ones new runs need; and a queue overflow that
    mends the watches instead of removing and adding them all (``on_queue_overflow``)."""

    # During an overflow's walk: the directories the watch limit left out, tried again after it.
    _held_back: list[bytes] | None = None

    def __post_init__(self) -> None:
        self._unlisted: set[DirNode] = set()  # watched by a walk that could not list them
        super().__post_init__()

    def _add_all_callbacks(self, path: bytes) -> None:
        for directory in self._directories(path):
            self._add_callback(directory)

    def _directories(self, path: bytes) -> Iterator[bytes]:
        """``path`` and, recursive, every directory below it: no symlink followed, no trash entered."""
        if _TRASH in path.removeprefix(self.path).split(b"/"):  # (below the watched root only)
            return
        is_directory = os.path.isdir(path)
        yield path
        if not (is_directory and self.is_recursive):
            return
        walk = walk_tree(path, follow_symlinks=self.follow_symlink, on_error=self._note_unlisted)
        for directory, names, _ in walk:
            if _TRASH in names:
                names.remove(_TRASH)  # (pruned: never entered)
            for name in names:
                subdirectory = os.path.join(directory, name)
                if self.follow_symlink or not os.path.islink(subdirectory):
                    yield subdirectory

    def on_queue_overflow(self) -> None:
        """Events were lost: make the watches match the tree as it is now, in one walk.

        watchdog removes every watch and adds them all again; each removal queues an ``IN_IGNORED``,
        so a tree with more directories than the kernel's queue (``fs.inotify.max_queued_events``,
        16,384 by default) overflows it again, for good. Here every directory the walk finds is asked
        of the kernel: one watched already keeps its watch descriptor and queues nothing. The nodes
        are rebuilt from the walk (a directory deleted and made again, or renamed, while events were
        lost is where the walk found it), and only the watches the walk did not return are removed:
        directories deleted, or moved out of the tree or into a trash. A directory the watch limit
        left out meanwhile is tried again once they are (their removal may have made the room).
        """
        if not isinstance(self._inotify_fd, ReportingInotifyFD):
            super().on_queue_overflow()
            return
        with self._lock:
            if not (self.is_active and self.is_recursive):
                return
            before = set(self._nodes_by_wd)
            self._root, self._nodes_by_wd = None, {}
            self._forget_moves_out()
            self._held_back = []
            try:
                self._add_all_callbacks(self.path)
            except OSError:
                pass  # the root itself is gone (said by the fd if it needs saying); the daemon re-arms
            finally:
                held_back, self._held_back = self._held_back, None
                stale = before - self._nodes_by_wd.keys()
                if stale:
                    self._inotify_fd.remove_callbacks([(wd, self._id) for wd in stale])
                    self._move_event_grouper.purge_events_for_wds(stale)
                for directory in held_back:
                    self._add_callback(directory)

    def _add_callback(self, path: bytes) -> None:
        """watchdog's, on ``ReportingInotifyFD.rejoin``: a directory whose watch the group holds
        already joins it quietly (watchdog warned that the callback was overwritten: an exception
        where warnings are errors, and the directory was lost). As watchdog's, only the root's
        failure, and the watch or instance limit while the group is set up (the daemon then polls),
        reach the caller; any other directory that cannot be watched is said (``report_unwatched``)
        and skipped, or, during an overflow's walk, left out by the watch limit until it is over."""
        reporting = self._inotify_fd
        if not isinstance(reporting, ReportingInotifyFD):
            super()._add_callback(path)
            return
        existing = self._find_node_by_path(path)
        if existing is not None and existing.wd != _INVALID_WD:
            return
        try:
            wd = reporting.rejoin(path, self.event_mask, self, self._id)
        except OSError as error:
            if path == self.path or (error.errno in _LIMITS and not self.is_active):
                raise
            if error.errno == errno.ENOSPC and self._held_back is not None:
                self._held_back.append(path)
            else:
                reporting.report_unwatched(path, error)
            return
        if self._insert_node(path, wd) is None:
            reporting.remove_callbacks([(wd, self._id)])

    def _note_unlisted(self, directory: bytes, error: OSError) -> None:
        """A directory watched by a walk that could not list it (renamed or removed in between): its
        subtree is not watched; if it was renamed, its move's event walks it (``on_event``)."""
        node = self._find_node_by_path(directory)
        if node is not None:
            if len(self._unlisted) >= _UNLISTED_SWEEP:  # (those deleted meanwhile: forgotten)
                self._unlisted = {old for old in self._unlisted if self._reconstruct_path_iterative(old)}
            self._unlisted.add(node)

    def on_event(self, event: InotifyEvent) -> None:
        """watchdog's, and a directory moved within the tree holding one a walk could not list is
        walked for what is not watched in it: watchdog only moves the watches it had there, and a
        directory renamed between a walk's watch of it and its listing (an overflow's walk over a
        large tree takes seconds) was otherwise watched without what is below it, for good."""
        super().on_event(event)
        if event.is_moved_to and event.is_directory and self.is_recursive and self._unlisted:
            with self._lock:
                destination = self._build_event_source_path(event) if self.is_active else None
                moved = self._find_node_by_path(destination) if destination is not None else None
                below = {node for node in self._unlisted if _is_within(node, moved)}
                if destination is not None and below:
                    self._unlisted -= below
                    self._add_all_callbacks(destination)  # (what is watched already costs its listing)

    def _forget_moves_out(self) -> None:
        """Drop the directory moves out of the tree still waiting for their other half: it was lost
        with the overflow, and their watches are the walk's to mend. Timed out later, one would remove
        the watches of whatever directory the walk found at its old path."""

        def moved_out_directory(event: GroupedInotifyEvent) -> bool:
            return isinstance(event, PathedInotifyEvent) and event.ev.is_moved_from and event.ev.is_directory

        while self._move_event_grouper._queue.remove(moved_out_directory) is not None:
            pass

    def _recursive_simulate(self, src_path: bytes) -> list[InotifyEvent]:
        """Creation events for what a new directory already held when its watch was added."""
        events: list[InotifyEvent] = []
        for directory, names, files in walk_tree(src_path, follow_symlinks=self.follow_symlink):
            node = self._find_node_by_path(directory)
            if node is None or self._nodes_by_wd.get(node.wd) is not node:  # (or a node on the way)
                continue  # not watched: its own creation event reports its contents
            events.extend(InotifyEvent(node.wd, _CREATED_DIRECTORY, 0, name) for name in names)
            events.extend(InotifyEvent(node.wd, InotifyConstants.IN_CREATE, 0, name) for name in files)
        return events


class DeepSafeInotifyEmitter(InotifyFullEmitter):
    """The full-move-events emitter on ``DeepSafeWatchGroup``; a moved directory is one event."""

    def on_thread_start(self) -> None:
        self._inotify = DeepSafeWatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
        )

    def build_and_queue_event(self, event: GroupedInotifyEvent, *, full_events: bool = True) -> None:
        moved = _moved_directory(event)
        if moved is None or not self.watch.is_recursive:
            super().build_and_queue_event(event, full_events=full_events)
            return
        source, destination = (self._decode_path(path) if path else "" for path in moved)
        self.queue_event(DirMovedEvent(source, destination))
        for path in (source, destination):
            if path:
                self.queue_event(DirModifiedEvent(os.path.dirname(path)))


def _is_within(node: DirNode | None, top: DirNode | None) -> bool:
    """True if ``node`` is ``top`` or below it in the watch tree (None: neither is there)."""
    while node is not None and top is not None:
        if node is top:
            return True
        node = node.parent
    return False


def _moved_directory(event: GroupedInotifyEvent) -> tuple[bytes, bytes] | None:
    """(source, destination) of a directory moved within the tree or in from outside it, else None."""
    if isinstance(event, PathedInotifyEvent):
        if event.ev.is_moved_to and event.ev.is_directory:
            return b"", event.path
        return None
    move_from, move_to = event
    return (move_from.path, move_to.path) if move_from.ev.is_directory else None


class DeepSafeInotifyObserver(InotifyObserver):
    """InotifyObserver on ``ReportingInotifyFD`` and ``DeepSafeInotifyEmitter``, lean by default."""

    def __init__(self) -> None:  # InotifyObserver.__init__, with the reporting instance and emitter
        self._inotify_fd = self._reporting = ReportingInotifyFD()
        self._inotify_fd.start()
        BaseObserver.__init__(
            self, DeepSafeInotifyEmitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self._inotify_fd
        )

    def report_unwatched_to(self, callback: Callable[[str], None] | None) -> None:
        """``callback`` gets each directory the watch limit left out (from watchdog's threads)."""
        self._reporting.unwatched = callback

    def report_lost_events_to(self, callback: LostEventsCallback | None) -> None:
        """``callback`` is called when handling an event failed (events may be lost)."""
        self._reporting.lost_events = callback

    def schedule(self, event_handler: Any, path: Any, *, recursive: bool = False, **options: Any) -> Any:
        options.setdefault("event_filter", INOTIFY_EVENTS)
        return super().schedule(event_handler, path, recursive=recursive, **options)
