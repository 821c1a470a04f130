"""The daemon's loop through its ``Place`` seam (place.py): what the loop does when the place says the
root is not there, refuses a pass, or must let go at exit. A scripted directory place stands in for a
directory or a bucket prefix; the files, the reconcile core and the worker thread are real."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import LogCapture

from ckpt_watcher.daemon import Watcher
from ckpt_watcher.lock import LockHeldError
from ckpt_watcher.notify import Notifier
from ckpt_watcher.place import Crew, DirectoryPlace, WatchOptions
from ckpt_watcher.policy import load_policy
from ckpt_watcher.reconcile import PassResult, Trigger
from ckpt_watcher.root import ArmedRoot, take_lock
from ckpt_watcher.session import Session
from tests.support.daemon import wait_until
from tests.support.factories import step_name, write_checkpoint
from tests.support.logs import logged
from tests.support.scripted_observer import ScriptedObservers

pytestmark = pytest.mark.timeout(60)


class RecordingNotifier(Notifier):
    """Keeps the sd_notify messages instead of sending them."""

    def __init__(self) -> None:
        super().__init__({})
        self.sent: list[tuple[str, ...]] = []

    def send(self, *lines: str) -> bool:
        self.sent.append(lines)
        return True

    def readies(self) -> list[str]:
        """The STATUS= of each READY=1, in order."""
        return [lines[1].removeprefix("STATUS=") for lines in list(self.sent) if lines[0] == "READY=1"]


class ScriptedPlace(DirectoryPlace):
    """A directory place the test opens and closes, and whose passes it may refuse."""

    def __init__(self, options: WatchOptions) -> None:
        super().__init__(options, ScriptedObservers())
        self.open = threading.Event()
        self.arm_attempts = 0
        self.refuse_passes: set[Trigger] = set()
        self.refused: list[Trigger] = []
        self.releases = 0

    def arm(self, crew: Crew) -> ArmedRoot | None:
        self.arm_attempts += 1
        return super().arm(crew) if self.open.is_set() else None

    def accepts(self, result: PassResult, session: Session | None) -> bool:
        if result.trigger in self.refuse_passes:
            self.refused.append(result.trigger)
            return False
        return True

    def release(self) -> None:
        self.releases += 1
        super().release()


def _watcher(root: Path, **options: Any) -> tuple[Watcher, ScriptedPlace, RecordingNotifier]:
    watch_options = WatchOptions(root=root, settle_seconds=0, **options)
    place = ScriptedPlace(watch_options)
    notifier = RecordingNotifier()
    return Watcher(watch_options, load_policy(None), place=place, notifier=notifier), place, notifier


def _running(watcher: Watcher) -> threading.Thread:
    thread = threading.Thread(target=watcher.run, name="test-worker")
    thread.start()
    return thread


def _stop(watcher: Watcher, thread: threading.Thread) -> None:
    watcher.request_stop()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_root_not_there_is_announced_once_with_one_ready_then_armed(
    tmp_path: Path, captured: LogCapture
) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    write_checkpoint(root / step_name(0, 100))
    watcher, place, notifier = _watcher(root)
    thread = _running(watcher)
    try:
        wait_until(lambda: place.arm_attempts >= 3, what="three attempts to arm")
        assert len(logged(captured, "watch_path_missing")) == 1
        assert notifier.readies() == [f"waiting for {root} to appear"]
        assert watcher.session is None
        place.open.set()
        wait_until(lambda: bool(logged(captured, "watch_started")), what="watch_started")
        [startup] = logged(captured, "pass_completed")
        assert startup["trigger"] == Trigger.STARTUP.value
        assert startup["kept"] == 1
        assert len(notifier.readies()) == 2  # READY=1 again once armed, with the pass's status
        assert notifier.readies()[1].startswith("kept 1 ")
    finally:
        _stop(watcher, thread)
    assert place.releases == 1
    assert len(logged(captured, "watch_stopped")) == 1


def test_a_pass_the_place_refuses_is_neither_logged_nor_counted(tmp_path: Path, captured: LogCapture) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    write_checkpoint(root / step_name(0, 100))
    watcher, place, _ = _watcher(root, rescan_seconds=0.2)
    place.refuse_passes = {Trigger.STARTUP}
    place.open.set()
    thread = _running(watcher)
    try:
        wait_until(lambda: bool(logged(captured, "watch_started")), what="watch_started")
        wait_until(lambda: bool(logged(captured, "pass_completed")), what="the first accepted pass")
        assert place.refused == [Trigger.STARTUP]
        assert logged(captured, "pass_completed")[0]["trigger"] == Trigger.RESCAN.value
    finally:
        _stop(watcher, thread)
    passes = watcher.crew.figures.snapshot().passes
    assert passes.get(Trigger.STARTUP.value, 0) == 0
    assert passes[Trigger.RESCAN.value] >= 1


def test_an_early_lock_is_released_at_exit_when_the_root_never_armed(
    tmp_path: Path, captured: LogCapture
) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    watcher, place, _ = _watcher(root)
    watcher.lock_now()
    with pytest.raises(LockHeldError):
        take_lock(root)
    thread = _running(watcher)
    wait_until(lambda: place.arm_attempts >= 2, what="two attempts to arm")
    _stop(watcher, thread)
    assert place.releases == 1
    take_lock(root).release()  # free again
