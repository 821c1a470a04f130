"""The observers and the reconcile core on very deep trees, with real inotify and real polling.

Cost is proven by counting work (events, naming look-ups), never by the clock: each test orders what
it waits for after what it measures (a sentinel file's event comes after every earlier event).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import LogCapture
from watchdog.events import FileSystemEvent, FileSystemEventHandler

from ckpt_watcher import delete
from ckpt_watcher.events import Batch, Inbox, ObserverLike, default_observer_factory
from ckpt_watcher.integrity import DIRECTORY_QUIET_SECONDS
from ckpt_watcher.naming import Naming
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.policy import load_policy
from ckpt_watcher.protection import ProtectionRegistry
from ckpt_watcher.reconcile import Reconciler, Trigger
from ckpt_watcher.root import ArmedRoot
from tests.support.daemon import running_daemon, wait_until
from tests.support.factories import backdate_tree, directory_checkpoint, step_name, write_checkpoint
from tests.support.hostile_trees import make_deep_directory, remove_deep
from tests.support.quiet_clock import QuietClock

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

DEEPER_THAN_THE_RECURSION_LIMIT = 1200


@pytest.fixture
def deep_cleanup(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, removed at any depth afterwards (pytest's own clean-up recurses)."""
    yield tmp_path
    remove_deep(tmp_path)


def _take_until(inbox: Inbox, last: Path) -> Batch:
    """Every batch up to the one holding ``last`` (its event comes after all earlier ones), merged."""
    merged = Batch()

    def arrived() -> bool:
        batch = inbox.take(0.2)
        merged.files |= batch.files
        merged.trees |= batch.trees
        merged.full_rescan |= batch.full_rescan
        return str(last) in merged.files

    wait_until(arrived, timeout=120, what=f"the event of {last}")
    return merged


def test_the_events_of_removing_a_deep_directory_checkpoint_are_few_and_cheap(
    deep_cleanup: Path, monkeypatch: pytest.MonkeyPatch, quiet_clock: QuietClock
) -> None:
    """The daemon deletes a directory checkpoint 1,200 levels deep (once seen quiet): the events of its
    own removal are one per entry, made up for no moved entry, all in the one group the checkpoint was
    in, found with a few naming look-ups (not one per ancestor of every path: 720,000 at this depth,
    minutes of the worker's time during which SIGTERM waited)."""
    run = deep_cleanup / "root" / "run"
    deep = directory_checkpoint(run / "epoch=05-step=000100-train.ckpt")
    make_deep_directory(deep / "checkpoint" / "nested", depth=DEEPER_THAN_THE_RECURSION_LIMIT)
    for step in range(200, 800, 100):
        directory_checkpoint(run / f"epoch=05-step={step:06d}-train.ckpt")
    backdate_tree(run)
    lookups = _count_naming_lookups(monkeypatch)
    inbox = Inbox()
    armed = ArmedRoot.arm(
        run.parent,
        inbox,
        lock=None,
        observer_factory=default_observer_factory,
        poll_interval=None,
        config_files=frozenset(),
    )
    assert armed is not None
    try:
        assert armed.observer_kind == "inotify"
        reconciler = Reconciler(
            PolicyTree(armed.path, load_policy(None), strict=False),
            ProtectionRegistry(deep_cleanup),
            pins={},
            settle_seconds=0,
            one_shot=False,
        )
        assert reconciler.run(Trigger.STARTUP).deleted == 0  # not yet seen unchanged for the quiet time
        quiet_clock.pass_quiet_time(DIRECTORY_QUIET_SECONDS)
        assert reconciler.run(Trigger.RESCAN).deleted == 2
        assert not deep.exists()
        sentinel = run / "sentinel.txt"
        sentinel.write_text("after the removals")
        batch = _take_until(inbox, sentinel)

        lookups.clear()
        touched = reconciler.groups_touched(batch.files, batch.trees)
    finally:
        armed.disarm()

    assert touched == {run}
    entries_removed = (
        2 * DEEPER_THAN_THE_RECURSION_LIMIT + 20
    )  # a file and a directory a level, and the shards
    assert len(batch.files) + len(batch.trees) <= 2 * entries_removed  # source and destination of a rename
    assert len(lookups) <= 3
    assert not batch.full_rescan


def _count_naming_lookups(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every directory whose naming the policy tree is asked for."""
    lookups: list[Path] = []
    original = PolicyTree.naming_for

    def counting(self: PolicyTree, directory: Path) -> Naming:
        lookups.append(directory)
        return original(self, directory)

    monkeypatch.setattr(PolicyTree, "naming_for", counting)
    return lookups


class Recorder(FileSystemEventHandler):
    """Keeps every event an observer delivers."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[FileSystemEvent] = []
        self._lock = threading.Lock()

    def dispatch(self, event: FileSystemEvent) -> None:
        with self._lock:
            self.events.append(event)

    def paths(self) -> list[str]:
        with self._lock:
            return [os.fsdecode(path) for event in self.events for path in (event.src_path, event.dest_path)]

    def until(self, path: Path) -> list[FileSystemEvent]:
        """The events up to the first that names ``path``, once it has come."""
        wait_until(lambda: str(path) in self.paths(), timeout=60, what=f"an event naming {path}")
        with self._lock:
            events = list(self.events)
        names = [{os.fsdecode(event.src_path), os.fsdecode(event.dest_path)} for event in events]
        return events[: next(index for index, name in enumerate(names) if str(path) in name) + 1]


def _watching(root: Path, poll_interval: float | None) -> Callable[[], tuple[ObserverLike, Recorder]]:
    def start() -> tuple[ObserverLike, Recorder]:
        recorder = Recorder()
        observer = default_observer_factory(poll_interval)
        observer.schedule(recorder, str(root), recursive=True)
        observer.start()
        return observer, recorder

    return start


def _stop(observer: ObserverLike) -> None:
    observer.stop()
    observer.join(timeout=10)


def test_a_directory_moved_within_the_tree_is_one_event_not_one_per_entry(deep_cleanup: Path) -> None:
    """watchdog makes up a move event for every entry of a moved directory, walking it with the
    recursive os.walk (RecursionError past ~1,000 levels, in the thread that reads every event); the
    router rescans a moved tree itself, so the move alone is reported."""
    root = deep_cleanup / "root"
    make_deep_directory(root / "run" / "a", depth=DEEPER_THAN_THE_RECURSION_LIMIT)
    observer, recorder = _watching(root, None)()
    try:
        (root / "run" / "a").rename(root / "run" / "b")
        sentinel = root / "sentinel.txt"
        sentinel.write_text("after the move")
        events = recorder.until(sentinel)
    finally:
        _stop(observer)

    moves = [event for event in events if event.event_type == "moved"]
    assert [(event.src_path, event.dest_path) for event in moves] == [
        (str(root / "run" / "a"), str(root / "run" / "b"))
    ]


@pytest.mark.parametrize("poll_interval", [None, 0.2], ids=["inotify", "polling"])
def test_a_subtree_past_path_max_is_said_once_and_the_rest_is_watched(
    deep_cleanup: Path, captured: LogCapture, poll_interval: float | None
) -> None:
    """A directory whose path is longer than PATH_MAX can be neither watched nor listed by path; both
    observers skipped it without a word. Each says so once, and watches the rest."""
    root = deep_cleanup / "root"
    too_long = _make_long_path(root / "run", name_length=250, levels=20)
    observer, recorder = _watching(root, poll_interval)()
    try:
        sentinel = root / "run" / "sentinel.txt"
        sentinel.write_text("watched")
        recorder.until(sentinel)
    finally:
        _stop(observer)

    warnings = [entry for entry in captured.entries if entry["event"] == "watch_incomplete"]
    assert len(warnings) == 1, warnings
    assert len(os.fsencode(warnings[0]["subtree"])) >= os.pathconf("/", "PC_PATH_MAX")
    assert too_long.startswith(warnings[0]["subtree"])


def _make_long_path(top: Path, *, name_length: int, levels: int) -> str:
    """Directories ``levels`` deep with ``name_length``-character names (made relative to open
    directories, since the whole path is longer than PATH_MAX); returns the deepest path."""
    top.mkdir(parents=True)
    name = "x" * name_length
    current = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=current)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
            os.close(current)
            current = child
    finally:
        os.close(current)
    return str(top) + f"/{name}" * levels


def test_the_polling_observer_never_follows_a_symlink(deep_cleanup: Path) -> None:
    """``last.ckpt -> /`` made watchdog's polling snapshot walk the whole file system at every poll."""
    root = deep_cleanup / "root"
    outside = deep_cleanup / "outside"
    (root / "run").mkdir(parents=True)
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"outside")
    os.symlink(outside, root / "run" / "last.ckpt")
    observer, recorder = _watching(root, 0.2)()
    try:
        (outside / "data.bin").write_bytes(b"changed outside the root")
        (outside / "new.bin").write_bytes(b"new outside the root")
        sentinel = root / "run" / "sentinel.txt"
        sentinel.write_text("inside")  # after the outside changes: a poll that sees it saw them
        recorder.until(sentinel)
    finally:
        _stop(observer)

    assert not [path for path in recorder.paths() if path.startswith(str(root / "run" / "last.ckpt") + "/")]


def test_the_daemons_start_up_pass_finishes_a_deep_leftover_and_keeps_running(deep_cleanup: Path) -> None:
    """A directory checkpoint whose removal was cut short (renamed to its leftover name, as delete.py
    does first) with a tree deeper than PATH_MAX and the recursion limit inside: the daemon's full
    pass removes it (``leftover_removed``) without a worker error, and goes on serving the run."""
    root = deep_cleanup / "checkpoints"
    interrupted = root / "run" / step_name(0, 100)
    make_deep_directory(interrupted, DEEPER_THAN_THE_RECURSION_LIMIT)
    leftover = interrupted.with_name(delete.leftover_name(interrupted.name, interrupted.stat().st_ino))
    interrupted.rename(leftover)
    for step in range(200, 900, 100):
        write_checkpoint(root / "run" / step_name(0, step))
    arguments = ["watch", str(root), "--settle", "0"]
    with running_daemon(arguments, deep_cleanup / "log") as daemon:
        daemon.wait_ready(timeout=120)
        daemon.wait_for("leftover_removed", timeout=120)
        assert not leftover.exists()
        wait_until(lambda: len(list((root / "run").iterdir())) == 5, what="the run pruned to 5")
        assert daemon.process.poll() is None
        assert daemon.stop() == 0
    assert [record["path"] for record in daemon.events("leftover_removed")] == [str(leftover)]
    assert daemon.events("worker_error") == []
    assert daemon.events("group_failed") == []
