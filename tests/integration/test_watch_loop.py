"""The daemon's loop driven by a scripted observer: exactly the events a test delivers, nothing else.

Real files in tmp_path, the real worker loop in a thread; the observer is a stand-in the test drives
(as watchfiles' tests drive a mock notifier), so each test decides which events arrive and when.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import LogCapture
from watchdog.events import DirMovedEvent, EventsLostEvent, FileClosedEvent, FileCreatedEvent

from ckpt_watcher import root as root_module
from ckpt_watcher.daemon import Watcher
from ckpt_watcher.integrity import DIRECTORY_QUIET_SECONDS
from ckpt_watcher.place import WatchOptions
from ckpt_watcher.policy import load_policy
from tests.support.daemon import wait_until
from tests.support.factories import step_name, write_checkpoint
from tests.support.logs import logged
from tests.support.quiet_clock import QuietClock
from tests.support.scripted_observer import ScriptedObserver, ScriptedObservers

pytestmark = pytest.mark.timeout(60)

AN_HOUR_AGO = time.time() - 3600


class RunningLoop:
    """A Watcher on ``root`` with scripted observers, its worker in a thread for the test's duration."""

    def __init__(
        self,
        root: Path,
        policy: Path | None = None,
        observers: Callable[[float | None], ScriptedObserver] | None = None,
        **options: Any,
    ) -> None:
        self.observers = ScriptedObservers() if observers is None else None
        factory = observers if observers is not None else self.observers
        assert factory is not None
        settings: dict[str, Any] = {"settle_seconds": 0, "rescan_seconds": 300, **options}
        self.watcher = Watcher(
            WatchOptions(root=root, policy_path=policy, **settings),
            load_policy(policy),
            observer_factory=factory,
        )
        self.thread = threading.Thread(target=self.watcher.run, name="test-worker")

    def __enter__(self) -> RunningLoop:
        self.thread.start()
        return self

    def __exit__(self, *exception: object) -> None:
        self.watcher.request_stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()

    @property
    def observer(self) -> ScriptedObserver:
        """The observer watching the root now."""
        assert self.observers is not None
        return self.observers.current


def _started(captured: LogCapture, event: str = "watch_started") -> None:
    wait_until(lambda: bool(logged(captured, event)), what=event)


def _steps(directory: Path, steps: range | list[int]) -> list[Path]:
    return [write_checkpoint(directory / step_name(0, step)) for step in steps]


def _count(directory: Path) -> int:
    return len([path for path in directory.iterdir() if path.name.endswith(".ckpt")])


def _hugging_face_checkpoint(directory: Path) -> Path:
    """A complete Hugging Face Trainer checkpoint directory, finished an hour ago."""
    write_checkpoint(directory / "model.safetensors")
    (directory / "trainer_state.json").write_text("{}")
    for path in (directory / "model.safetensors", directory / "trainer_state.json", directory):
        os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))
    return directory


def test_an_event_inside_a_directory_checkpoint_replans_the_group_that_holds_it(
    tmp_path: Path, captured: LogCapture, quiet_clock: QuietClock
) -> None:
    """Hugging Face names directories ``checkpoint-{step}`` (no .ckpt): a file closed inside
    ``checkpoint-200/`` is news for ``run/``, whose oldest checkpoint it pushes out once the daemon
    has seen it unchanged for its quiet time."""
    policy = tmp_path / "policy.yaml"
    policy.write_text('save_top_k_checkpoints: 1\nnaming:\n  step: "checkpoint-{step}"\n')
    root = tmp_path / "root"
    run = root / "run"
    _hugging_face_checkpoint(run / "checkpoint-100")
    with RunningLoop(root, policy) as loop:
        _started(captured)
        newer = _hugging_face_checkpoint(run / "checkpoint-200")

        loop.observer.deliver(FileClosedEvent(str(newer / "trainer_state.json")))
        wait_until(lambda: bool(_passes(captured, "event")), timeout=10, what="the event pass")
        first_seen_then = (run / "checkpoint-100").exists()
        quiet_clock.pass_quiet_time(DIRECTORY_QUIET_SECONDS)  # both unchanged since
        loop.observer.deliver(FileClosedEvent(str(newer / "trainer_state.json")))

        wait_until(lambda: not (run / "checkpoint-100").exists(), timeout=10, what="checkpoint-100 deleted")
        assert first_seen_then
        assert newer.exists()


def _passes(captured: LogCapture, trigger: str) -> list[MutableMapping[str, Any]]:
    """The ``pass_completed`` records of passes with ``trigger``, oldest first."""
    return [entry for entry in logged(captured, "pass_completed") if entry["trigger"] == trigger]


def test_a_closed_checkpoint_replans_its_own_group_and_no_other(tmp_path: Path, captured: LogCapture) -> None:
    root = tmp_path / "root"
    _steps(root / "a", range(100, 600, 100))
    _steps(root / "b", range(100, 600, 100))
    with RunningLoop(root) as loop:
        _started(captured)
        newest_a = write_checkpoint(root / "a" / step_name(0, 600))
        write_checkpoint(root / "b" / step_name(0, 600))  # no event for this one

        loop.observer.deliver(FileClosedEvent(str(newest_a)))

        wait_until(lambda: _count(root / "a") == 5, timeout=10, what="a pruned to 5")
        # The pass is logged after its deletions: wait for its record too.
        wait_until(lambda: bool(_passes(captured, "event")), timeout=10, what="the event pass's record")
        assert _passes(captured, "event")[-1]["groups"] == 1
        assert _count(root / "b") == 6, "b had no event and no rescan is due: it must not be planned"


def test_an_inotify_overflow_plans_everything_again(tmp_path: Path, captured: LogCapture) -> None:
    root = tmp_path / "root"
    _steps(root / "a", range(100, 500, 100))
    with RunningLoop(root) as loop:
        _started(captured)
        _steps(root / "a", [500, 600, 700])  # events lost in the overflow

        # watchdog's event after an overflow, queued once the watches are mended
        loop.observer.deliver(EventsLostEvent(str(root), is_directory=True))

        wait_until(lambda: _count(root / "a") == 5, timeout=10, what="a full pass after the overflow")
        wait_until(lambda: bool(_passes(captured, "full")), timeout=10, what="the full pass's record")


def test_a_directory_swapped_for_a_symlink_to_where_it_went_is_planned_where_it_is(
    tmp_path: Path, captured: LogCapture
) -> None:
    """``mv proj out/; ln -s out/proj proj``: the run, planned at its new path, has the identity the
    start-up walk saw at ``proj/run1``, and that path still leads to it (through the symlink). It was
    taken for one directory at two paths (``group_aliased``, "a bind mount"): nothing deleted in it
    until the next full walk (5 min by default). A path of the walk counts only if no symlink leads
    there."""
    root = tmp_path / "root"
    run = root / "out" / "proj" / "run1"
    _steps(root / "proj" / "run1", range(100, 600, 100))
    (root / "out").mkdir()
    with RunningLoop(root) as loop:
        _started(captured)
        (root / "proj").rename(root / "out" / "proj")
        (root / "proj").symlink_to("out/proj")
        newest = write_checkpoint(run / step_name(0, 600))

        loop.observer.deliver(DirMovedEvent(str(root / "proj"), str(root / "out" / "proj")))
        loop.observer.deliver(FileCreatedEvent(str(root / "proj")))
        loop.observer.deliver(FileClosedEvent(str(newest)))

        wait_until(lambda: _count(run) == 5, timeout=10, what="the run pruned where it is now")
        wait_until(lambda: bool(_passes(captured, "event")), timeout=10, what="the event pass's record")
    assert not logged(captured, "group_aliased")


class UnwatchingObserver(ScriptedObserver):
    """A scripted observer that, like the lean inotify one, reports directories it could not watch."""

    def __init__(self, poll_interval: float | None = None) -> None:
        super().__init__(poll_interval)
        self.unwatched: Callable[[str], None] | None = None

    def report_unwatched_to(self, callback: Callable[[str], None] | None) -> None:
        self.unwatched = callback


def _root_with(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A root, and a directory ``name`` in it."""
    root = tmp_path / "root"
    (root / name).mkdir(parents=True)
    return root, root / name


def test_a_directory_inotify_cannot_watch_is_polled_until_it_can_be(
    tmp_path: Path, captured: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    room = threading.Event()
    monkeypatch.setattr(root_module, "inotify_has_room", lambda directories: room.is_set())
    made: list[UnwatchingObserver] = []

    def factory(poll_interval: float | None) -> UnwatchingObserver:
        made.append(UnwatchingObserver(poll_interval))
        return made[-1]

    root, late = _root_with(tmp_path, "late")
    with RunningLoop(root, observers=factory):
        _started(captured)
        assert made[-1].unwatched is not None
        made[-1].unwatched(str(late))  # the watch limit was hit for this directory
        wait_until(lambda: bool(logged(captured, "inotify_unavailable")), what="inotify_unavailable")
        assert logged(captured, "inotify_unavailable")[0]["subtree"] == str(late)

        _steps(late, range(100, 800, 100))  # no event: only polling can see these
        wait_until(lambda: _count(late) == 5, timeout=20, what="the unwatched subtree pruned by polling")
        assert not logged(captured, "inotify_restored")
        roots_watched = [path for _, path, recursive in made[-1].scheduled if recursive]

        room.set()
        wait_until(lambda: bool(logged(captured, "inotify_restored")), timeout=20, what="inotify_restored")
        assert logged(captured, "inotify_restored")[0]["subtree"] == str(late)
        assert [path for _, path, recursive in made[-1].scheduled if recursive] == roots_watched


class FullObserver(UnwatchingObserver):
    """An inotify stand-in whose watch limit leaves no room for the whole tree (once ``full`` is set)."""

    full = False

    def schedule(self, event_handler: Any, path: str, *, recursive: bool = False) -> tuple[Any, str, bool]:
        if self.full and recursive:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return super().schedule(event_handler, path, recursive=recursive)


def test_a_root_that_no_longer_fits_when_watched_again_is_polled_whole(
    tmp_path: Path, captured: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The room check before watching the root again looks at the unwatched subtrees only; the tree
    grew meanwhile and the watch limit was hit again: the root stayed unwatched, and each later try
    unscheduled the gone watch again (KeyError, a worker_error every 5 s). It is now set up as at the
    start: polled whole, with a warning."""
    monkeypatch.setattr(root_module, "inotify_has_room", lambda directories: True)
    made: list[FullObserver] = []

    def factory(poll_interval: float | None) -> FullObserver:
        made.append(FullObserver(poll_interval))
        made[-1].full = len(made) > 1 and poll_interval is None
        return made[-1]

    root, late = _root_with(tmp_path, "late")
    with RunningLoop(root, observers=factory):
        _started(captured)
        first = made[-1]
        assert first.unwatched is not None
        first.full = True
        first.unwatched(str(late))  # the watch limit was hit for this directory

        wait_until(lambda: made[-1].poll_interval is not None, timeout=20, what="the root polled whole")
        wait_until(
            lambda: any(entry["subtree"] == str(root) for entry in logged(captured, "inotify_unavailable")),
            what="the root's inotify_unavailable",
        )
    assert not logged(captured, "worker_error")
    assert not logged(captured, "inotify_restored")


def test_a_root_deleted_and_made_again_is_watched_by_a_new_observer(
    tmp_path: Path, captured: LogCapture
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with RunningLoop(root) as loop:
        _started(captured)
        first = loop.observer
        shutil.rmtree(root)
        wait_until(lambda: bool(logged(captured, "watch_path_lost")), what="watch_path_lost")
        assert not first.is_alive()

        root.mkdir()
        _started(captured, "watch_rearmed")
        assert loop.observer is not first
        assert loop.observer.is_alive()
        newest = _steps(root, range(100, 800, 100))[-1]
        loop.observer.deliver(FileClosedEvent(str(newest)))
        wait_until(lambda: _count(root) == 5, timeout=10, what="pruning after re-arming")


def test_a_policy_edit_applies_to_every_group_without_any_event(tmp_path: Path, captured: LogCapture) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 5\n")
    root = tmp_path / "root"
    _steps(root / "a", range(100, 600, 100))
    _steps(root / "b", range(100, 600, 100))
    with RunningLoop(root, policy):
        _started(captured)

        policy.write_text("save_top_k_checkpoints: 2\n")  # the scripted observer says nothing

        wait_until(lambda: _count(root / "a") == _count(root / "b") == 2, what="both groups at 2")
        reloaded = logged(captured, "policy_reloaded")[0]
        assert reloaded["changes"] == {"save_top_k_checkpoints": {"old": 5, "new": 2}}
