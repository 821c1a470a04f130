"""An inotify queue overflow, with the kernel's own watches to check (``/proc/self/fdinfo``): the watch
group mends its watches in one walk that queues nothing for a directory it still watches.

watchdog's own rebuild removed every watch and added them all again; each removal queued an
``IN_IGNORED``, so a tree with more directories than the kernel's queue overflowed it again, for good.
The instance here is not started until the test has done what was to be lost: nothing reads the queue.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.inotify_c import InotifyConstants, Mask, WatchDescriptor, inotify_add_watch
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper, PathedInotifyEvent

from ckpt_watcher.inotify_observer import DeepSafeWatchGroup, ReportingInotifyFD
from ckpt_watcher.observers import walk_tree
from ckpt_watcher.records import TRASH_DIRECTORY_NAME
from tests.support.daemon import wait_until

pytestmark = pytest.mark.timeout(120)

_MASK = Mask(
    InotifyConstants.IN_CREATE
    | InotifyConstants.IN_DELETE
    | InotifyConstants.IN_MOVE
    | InotifyConstants.IN_CLOSE_WRITE
    | InotifyConstants.IN_DELETE_SELF
)


class RecordingGrouper(InotifyMoveEventGrouper):
    """The group's event queue, also keeping the path of every event the group put in it."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[bytes] = []

    def put_event(self, event: PathedInotifyEvent) -> None:
        self.paths.append(event.path)
        super().put_event(event)


class CountingGroup(DeepSafeWatchGroup):
    """The daemon's watch group, counting the overflows it handled."""

    overflows = 0
    handled = threading.Event()

    def on_queue_overflow(self) -> None:
        super().on_queue_overflow()
        self.overflows += 1
        self.handled.set()


def _kernel_watches(instance: ReportingInotifyFD) -> dict[int, int]:
    """The instance's watches as the kernel lists them: watch descriptor -> the inode watched."""
    watches: dict[int, int] = {}
    with open(f"/proc/self/fdinfo/{instance._inotify_fd}") as info:
        for line in info:
            if line.startswith("inotify wd:"):
                fields = dict(field.split(":", 1) for field in line.split()[1:])
                watches[int(fields["wd"], 16)] = int(fields["ino"], 16)
    return watches


def _kernel_watch_of(instance: ReportingInotifyFD, directory: Path) -> int:
    """The watch descriptor the kernel has on ``directory``."""
    inode = directory.stat().st_ino
    (wd,) = (wd for wd, watched in _kernel_watches(instance).items() if watched == inode)
    return wd


def _directories(root: Path) -> dict[Path, int]:
    """Every directory of the tree (the trash not entered), with its inode."""
    found = {root: root.stat().st_ino}
    for directory, names, _ in os.walk(root):
        if TRASH_DIRECTORY_NAME in names:
            names.remove(TRASH_DIRECTORY_NAME)
        for name in names:
            path = Path(directory, name)
            found[path] = path.stat().st_ino
    return found


def _queued(instance: ReportingInotifyFD) -> bytes:
    """What the kernel queued on the (unread) instance, read now without waiting."""
    readable, _, _ = select.select([instance._inotify_fd], [], [], 0)
    return os.read(instance._inotify_fd, 1 << 20) if readable else b""


def _assert_watches_match_the_tree(
    group: DeepSafeWatchGroup, instance: ReportingInotifyFD, root: Path
) -> None:
    """The kernel watches exactly the tree's directories, and the group names each by its path now."""
    kernel = _kernel_watches(instance)
    directories = _directories(root)
    assert sorted(kernel.values()) == sorted(directories.values()), "a watch missing, or one left behind"
    for path, inode in directories.items():
        (wd,) = (wd for wd, watched in kernel.items() if watched == inode)
        assert group._resolve_path(WatchDescriptor(wd)) == os.fsencode(path), (
            f"{path} is known by another path"
        )
    assert set(instance._watch_for_wd) == set(kernel), "watchdog's book of watches differs from the kernel's"


def _seen_and_watched(
    group: DeepSafeWatchGroup, instance: ReportingInotifyFD, recorder: RecordingGrouper, written: Path
) -> None:
    """A file written now is reported by its path, and the watches match the tree."""
    written.touch()
    wait_until(lambda: os.fsencode(written) in recorder.paths, timeout=30, what=f"an event for {written}")
    _assert_watches_match_the_tree(group, instance, Path(os.fsdecode(group.path)))


@pytest.fixture
def unread(tmp_path: Path) -> Iterator[tuple[Path, ReportingInotifyFD, CountingGroup]]:
    """A tree watched by the daemon's watch group on an inotify instance nobody reads yet."""
    root = tmp_path / "root"
    for directory in ("a/inner", "b", "c", "d/e/f", "flood", TRASH_DIRECTORY_NAME):
        (root / directory).mkdir(parents=True)
    instance = ReportingInotifyFD()
    group = CountingGroup(instance, os.fsencode(root), event_mask=_MASK, is_recursive=True)
    group.handled = threading.Event()
    try:
        yield root, instance, group
    finally:
        group.deactivate()
        if instance.is_alive():
            instance.stop()
            instance.join(timeout=10)
        else:
            instance._is_reading = False  # (never started: close releases the descriptors itself)
            instance.close()


def test_an_overflow_on_an_unchanged_tree_queues_nothing_and_keeps_every_watch(
    unread: tuple[Path, ReportingInotifyFD, CountingGroup],
) -> None:
    """The loop: removing and re-adding every watch queued an IN_IGNORED per directory."""
    root, instance, group = unread
    before = _kernel_watches(instance)
    assert len(before) == len(_directories(root)) == 9
    assert _queued(instance) == b""

    group.on_queue_overflow()

    assert _queued(instance) == b"", "mending the watches queued events of its own"
    assert _kernel_watches(instance) == before
    _assert_watches_match_the_tree(group, instance, root)


def test_what_changed_while_events_were_lost_is_watched_where_it_is_now(
    unread: tuple[Path, ReportingInotifyFD, CountingGroup],
) -> None:
    """A directory deleted and made again, one renamed, one moved into the trash, one deleted with
    what was below it, and new ones: each watched where it is, nothing watched in the trash, no watch
    left on what went, and no warning (every warning is an error here)."""
    root, instance, group = unread
    trashed = _kernel_watch_of(instance, root / "c")
    shutil.rmtree(root / "a")
    (root / "a" / "inner").mkdir(parents=True)  # the same paths, new directories
    (root / "b").rename(root / "b2")
    (root / "c").rename(root / TRASH_DIRECTORY_NAME / "c")
    shutil.rmtree(root / "d")
    (root / "new" / "deep").mkdir(parents=True)
    _queued(instance)  # (events lost: nobody read them)

    group.on_queue_overflow()

    _assert_watches_match_the_tree(group, instance, root)
    ignored = [(wd, mask) for wd, mask, _, _ in ReportingInotifyFD._parse_event_buffer(_queued(instance))]
    assert ignored == [(trashed, InotifyConstants.IN_IGNORED)], "only the watch moved into the trash went"


def test_a_real_overflow_is_handled_once_and_events_after_it_name_the_paths_of_now(
    unread: tuple[Path, ReportingInotifyFD, CountingGroup], caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel's own overflow: more events than ``fs.inotify.max_queued_events`` while nobody reads
    the instance, after the tree changed. Once the overflow is handled, the files written in the
    directories made again, renamed or new are reported by their paths now, and nothing in the trash."""
    root, instance, group = unread
    recorder = RecordingGrouper()
    group._move_event_grouper = recorder
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    flood = root / "flood" / "file"
    for _ in range(limit // 2 + 1):  # a creation, a close and a deletion each: well over the limit
        flood.touch()
        flood.unlink()
    shutil.rmtree(root / "a")  # (the queue is full: these events are lost)
    (root / "a").mkdir()
    (root / "b").rename(root / "b2")
    (root / "c").rename(root / TRASH_DIRECTORY_NAME / "c")
    (root / "new").mkdir()

    instance.start()
    wait_until(group.handled.is_set, timeout=60, what="the overflow handled")
    trash = root / TRASH_DIRECTORY_NAME
    written = [root / "a" / "x", root / "b2" / "y", root / "new" / "z", trash / "c" / "w"]
    for path in written:
        path.touch()
    wait_until(
        lambda: all(os.fsencode(path) in recorder.paths for path in written[:3]),
        timeout=30,
        what="the files written after the overflow, by their paths",
    )

    assert group.overflows == 1
    said = [record for record in caplog.records if "overflow" in record.getMessage().lower()]
    assert len(said) == 1, "the overflow is said once (the daemon's listener turns each into a record)"
    assert os.fsencode(written[3]) not in recorder.paths
    assert not any(TRASH_DIRECTORY_NAME.encode() in path for path in recorder.paths)
    _assert_watches_match_the_tree(group, instance, root)


def test_an_overflow_on_a_tree_with_more_directories_than_the_queue_ends(
    unread: tuple[Path, ReportingInotifyFD, CountingGroup],
) -> None:
    """The loop itself: a shared volume of 2,000 runs of 50 directory checkpoints has 100,000
    directories, over six times the default queue. One overflow, then events again as before."""
    root, instance, group = unread
    recorder = RecordingGrouper()
    group._move_event_grouper = recorder
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 1 << 16:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: a larger tree is too slow to make here")
    many = root / "many"
    for number in range(limit + 1_000):
        (many / f"checkpoint-{number}").mkdir(parents=True)
    group.on_queue_overflow()  # (watches the new directories: nothing read the events of their making)
    group.overflows = 0
    group.handled.clear()
    assert len(_kernel_watches(instance)) > limit
    flood = root / "flood" / "file"
    for _ in range(limit // 2 + 1):
        flood.touch()
        flood.unlink()

    instance.start()
    wait_until(group.handled.is_set, timeout=60, what="the overflow handled")
    written = many / f"checkpoint-{limit}" / "after"
    written.touch()
    wait_until(lambda: os.fsencode(written) in recorder.paths, timeout=30, what="an event after it")

    assert group.overflows == 1


def test_events_replayed_after_the_walk_keep_the_directories_it_watched(
    unread: tuple[Path, ReportingInotifyFD, CountingGroup],
) -> None:
    """Events queued after the overflow, before the walk reached their directory, are handled after
    it: ``rm -rf d; mkdir -p d/e`` replays a deletion and a creation of a directory the walk watched
    already. Joining the watch the group held raised watchdog's warning that the callback was
    overwritten (an exception where warnings are errors), and ``d`` was lost with what is below it."""
    root, instance, group = unread
    recorder = RecordingGrouper()
    group._move_event_grouper = recorder
    shutil.rmtree(root / "d")
    (root / "d" / "e").mkdir(parents=True)
    group.on_queue_overflow()  # (the walk sees the tree as it is now; the events of the change wait)

    instance.start()

    _seen_and_watched(group, instance, recorder, root / "d" / "e" / "after")


def test_a_directory_renamed_while_the_walk_runs_is_watched_whole(
    unread: tuple[Path, ReportingInotifyFD, CountingGroup], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer's ``tmp-9`` renamed to ``checkpoint-9`` after the walk watched it and before it was
    listed: its shards were never reached, their watches were removed as stale, and the rename's
    events (read after the walk) only moved the node. The shards stayed unwatched for good."""
    root, instance, group = unread
    recorder = RecordingGrouper()
    group._move_event_grouper = recorder
    for shard in ("shard-0", "shard-1"):
        (root / "tmp-9" / shard).mkdir(parents=True)
    group.on_queue_overflow()  # (watches the new directories: their events are not read)
    walk = walk_tree

    def renaming_during(top: bytes, **options: Any) -> Iterator[tuple[bytes, list[bytes], list[bytes]]]:
        for listing in walk(top, **options):
            yield listing
            if listing[0] == os.fsencode(root) and (root / "tmp-9").exists():
                (root / "tmp-9").rename(root / "checkpoint-9")  # (root listed; tmp-9 not yet)

    monkeypatch.setattr("ckpt_watcher.inotify_observer.walk_tree", renaming_during)
    group.on_queue_overflow()
    monkeypatch.setattr("ckpt_watcher.inotify_observer.walk_tree", walk)

    instance.start()
    last_shard = os.fsencode(root / "checkpoint-9" / "shard-1")
    wait_until(lambda: last_shard in group._active_callbacks_by_path, timeout=30, what="the shards watched")

    _seen_and_watched(group, instance, recorder, root / "checkpoint-9" / "shard-1" / "after")


def test_the_watches_the_walk_removes_make_room_for_the_directories_it_found(
    unread: tuple[Path, ReportingInotifyFD, CountingGroup], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the watch limit (``fs.inotify.max_user_watches``), directories made while events were lost
    were refused during the walk, because the watches of the checkpoints moved into the trash were
    only removed after it: they were handed to the daemon's polling, with room for them."""
    root, instance, group = unread
    limit = len(_kernel_watches(instance))

    def at_the_limit(descriptor: int, path: bytes, mask: int) -> int:
        watched = _kernel_watches(instance).values()
        if len(watched) >= limit and os.stat(path).st_ino not in watched:
            ctypes.set_errno(errno.ENOSPC)
            return -1
        return inotify_add_watch(descriptor, path, mask)

    monkeypatch.setattr("ckpt_watcher.inotify_observer.inotify_add_watch", at_the_limit)
    unwatched: list[str] = []
    instance.unwatched = unwatched.append
    (root / "c").rename(root / TRASH_DIRECTORY_NAME / "c")
    (root / "d").rename(root / TRASH_DIRECTORY_NAME / "d")  # (d, e and f: four watches with c)
    for name in ("new-1", "new-2", "new-3"):
        (root / name).mkdir()

    group.on_queue_overflow()

    assert unwatched == []
    _assert_watches_match_the_tree(group, instance, root)
    assert len(_kernel_watches(instance)) == limit - 1


def test_a_directory_renamed_in_the_tree_is_not_walked_again(
    unread: tuple[Path, ReportingInotifyFD, CountingGroup], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a directory a walk could not list is walked after its move: every other rename (a Hugging
    Face ``tmp-checkpoint-N``, the daemon's own ``.ckpt-watcher-deleting-`` prefix before a removal)
    keeps its watches as watchdog moved them, without a walk of what is below it (a large sharded
    checkpoint under the group's lock)."""
    root, instance, group = unread
    walked: list[bytes] = []

    def counting(top: bytes, **options: Any) -> Iterator[tuple[bytes, list[bytes], list[bytes]]]:
        walked.append(top)
        return walk_tree(top, **options)

    monkeypatch.setattr("ckpt_watcher.inotify_observer.walk_tree", counting)
    instance.start()
    (root / "d").rename(root / "d2")
    moved = os.fsencode(root / "d2" / "e" / "f")
    wait_until(lambda: moved in group._active_callbacks_by_path, timeout=30, what="the watches moved")

    assert walked == []
    _assert_watches_match_the_tree(group, instance, root)
