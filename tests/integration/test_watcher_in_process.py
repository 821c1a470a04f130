"""The worker in-process, for failures a subprocess cannot stage: dead observers, inotify limits, overflow."""

from __future__ import annotations

import errno
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from structlog.testing import LogCapture
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, WatchDescriptor

from ckpt_watcher import daemon as daemon_module
from ckpt_watcher.daemon import Watcher
from ckpt_watcher.events import Batch, ObserverLike, default_observer_factory
from ckpt_watcher.place import WatchOptions
from ckpt_watcher.policy import load_policy
from ckpt_watcher.reconcile import Trigger
from ckpt_watcher.session import Session
from ckpt_watcher.trash import list_trash
from ckpt_watcher.trash_moves import restore
from tests.support.daemon import wait_until
from tests.support.factories import step_name, write_checkpoint
from tests.support.logs import logged
from tests.support.pin_faults import failing_pin_reads
from tests.support.scripted_observer import ScriptedObserver

pytestmark = pytest.mark.timeout(60)


class RunningWatcher:
    """A Watcher whose worker runs in a thread for the duration of a test."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.thread = threading.Thread(target=watcher.run, name="test-worker")

    def __enter__(self) -> Watcher:
        self.thread.start()
        return self.watcher

    def __exit__(self, *exception: object) -> None:
        self.watcher.request_stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def _watcher(root: Path, **options: Any) -> Watcher:
    return Watcher(WatchOptions(root=root, settle_seconds=0, **options), load_policy(None))


def _pruned_to_five(root: Path) -> bool:
    return len([path for path in root.iterdir() if path.suffix == ".ckpt"]) == 5


def test_dead_observer_is_restarted_and_pruning_goes_on(tmp_path: Path, captured: LogCapture) -> None:
    watcher = _watcher(tmp_path)
    with RunningWatcher(watcher):
        wait_until(lambda: bool(logged(captured, "watch_started")), what="watch_started")
        assert watcher.session is not None
        observer = watcher.session.root.observer
        assert observer is not None
        observer.stop()  # the observer thread dies
        observer.join(timeout=5)

        wait_until(lambda: bool(logged(captured, "observer_restarted")), what="observer_restarted")
        for step in range(100, 800, 100):
            write_checkpoint(tmp_path / step_name(0, step))
        wait_until(lambda: _pruned_to_five(tmp_path), what="pruning with the restarted observer")


def test_inotify_limit_falls_back_to_polling(tmp_path: Path, captured: LogCapture) -> None:
    def factory(poll_interval: float | None) -> ObserverLike:
        if poll_interval is None:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return default_observer_factory(0.1)

    watcher = Watcher(
        WatchOptions(root=tmp_path, settle_seconds=0), load_policy(None), observer_factory=factory
    )
    with RunningWatcher(watcher):
        wait_until(lambda: bool(logged(captured, "watch_started")), what="watch_started")
        assert logged(captured, "inotify_unavailable")[0]["error"] == "inotify watch limit reached"
        assert "inotify unavailable" in logged(captured, "watch_started")[0]["observer"]
        for step in range(100, 800, 100):
            write_checkpoint(tmp_path / step_name(0, step))
        wait_until(lambda: _pruned_to_five(tmp_path), what="pruning by the fallback poller")


def test_inotify_overflow_triggers_a_full_rescan(tmp_path: Path, captured: LogCapture) -> None:
    """The overflow as the kernel reports it, handed to the daemon's own inotify instance: said once,
    the watches mended, then one full pass (asked by watchdog's EventsLostEvent, after the mending)."""
    watcher = _watcher(tmp_path)
    with RunningWatcher(watcher):
        wait_until(lambda: bool(logged(captured, "watch_started")), what="watch_started")
        assert watcher.session is not None
        instance = cast(Any, watcher.session.root.observer)._reporting

        instance.handle_event(InotifyEvent(WatchDescriptor(-1), InotifyConstants.IN_Q_OVERFLOW, 0, b""))

        wait_until(
            lambda: any(entry["trigger"] == "full" for entry in logged(captured, "pass_completed")),
            what="a full rescan after the overflow",
        )
        assert len(logged(captured, "event_queue_overflow")) == 1


def test_periodic_rescan_finds_what_no_event_announced(tmp_path: Path, captured: LogCapture) -> None:
    """Events are hints: with no observer events at all, the rescan still prunes."""
    watcher = Watcher(
        WatchOptions(root=tmp_path, settle_seconds=0, rescan_seconds=0.3),
        load_policy(None),
        observer_factory=ScriptedObserver,  # delivers nothing unless a test tells it to
    )
    with RunningWatcher(watcher):
        wait_until(lambda: bool(logged(captured, "watch_started")), what="watch_started")
        for step in range(100, 800, 100):
            write_checkpoint(tmp_path / step_name(0, step))
        wait_until(lambda: _pruned_to_five(tmp_path), what="pruning by the periodic rescan")
        wait_until(  # the pass is logged after its deletions
            lambda: any(entry["trigger"] == "rescan" for entry in logged(captured, "pass_completed")),
            what="the rescan pass's record",
        )


class CallCounter:
    """Counts the Python function calls the worker thread makes while ``counting`` is set: work, not time."""

    def __init__(self) -> None:
        self.calls = 0
        self.counting = False

    def profile(self, frame: Any, event: str, argument: Any) -> None:
        if event == "call" and self.counting:
            self.calls += 1

    def run_profiled(self, watcher: Watcher) -> None:
        sys.setprofile(self.profile)
        try:
            watcher.run()
        finally:
            sys.setprofile(None)


def _work_for_a_burst_of_new_directories(root: Path, captured: LogCapture, count: int) -> int:
    """Calls made by the worker while ``count`` new directories appear beside ``count`` known ones."""
    for index in range(count):
        (root / f"run-{index:05d}").mkdir(parents=True)
    watcher = _watcher(root)
    counter = CallCounter()
    thread = threading.Thread(target=counter.run_profiled, args=(watcher,), name="test-worker")
    thread.start()
    try:
        wait_until(lambda: bool(logged(captured, "watch_started")), timeout=60, what="watch_started")
        counter.counting = True
        for index in range(count):
            (root / f"new-{index:05d}").mkdir()
        last = root / f"new-{count - 1:05d}"
        for step in range(100, 800, 100):
            write_checkpoint(last / step_name(0, step))
        wait_until(lambda: _pruned_to_five(last), timeout=120, what="the burst handled (pruning after it)")
        counter.counting = False
    finally:
        watcher.request_stop()
        thread.join(timeout=30)
    captured.entries.clear()
    return counter.calls


@pytest.mark.timeout(240)
def test_a_burst_of_new_directories_costs_linear_work(tmp_path: Path, captured: LogCapture) -> None:
    """4x the directories (known and new) must cost about 4x the work, not 16x (each new directory
    compared with every known group)."""
    small = _work_for_a_burst_of_new_directories(tmp_path / "small", captured, 300)
    large = _work_for_a_burst_of_new_directories(tmp_path / "large", captured, 1200)

    assert large / small < 7, f"{small} calls for 300 new directories, {large} for 1200"


def test_without_any_observer_the_daemon_arms_and_serves_by_rescans(
    tmp_path: Path, captured: LogCapture
) -> None:
    """Neither inotify nor polling can be set up (here: a RecursionError from a walk, as watchdog's
    raised on a deep tree): the daemon arms anyway, rescans everything every 5 s, and watches again as
    soon as an observer can be set up."""
    observers_work = threading.Event()

    def factory(poll_interval: float | None) -> ObserverLike:
        if not observers_work.is_set():
            raise RecursionError("maximum recursion depth exceeded")
        return default_observer_factory(poll_interval)

    watcher = Watcher(
        WatchOptions(root=tmp_path, settle_seconds=0), load_policy(None), observer_factory=factory
    )
    with RunningWatcher(watcher):
        wait_until(lambda: bool(logged(captured, "watch_started")), what="watch_started")
        warning = logged(captured, "watch_incomplete")[0]
        assert (warning["observer"], warning["subtree"]) == ("none", str(tmp_path))
        assert "RecursionError" in warning["error"]
        assert logged(captured, "watch_started")[0]["observer"] == "none: rescanning every 5 s"
        for step in range(100, 800, 100):
            write_checkpoint(tmp_path / step_name(0, step))
        wait_until(lambda: _pruned_to_five(tmp_path), what="pruning by a rescan")

        observers_work.set()
        wait_until(lambda: bool(logged(captured, "watch_restored")), timeout=45, what="watch_restored")
        assert logged(captured, "watch_restored")[0]["observer"] == "inotify"
        assert len(logged(captured, "watch_incomplete")) == 1  # said once, not at every try
        assert not logged(captured, "worker_error")


@pytest.mark.parametrize("poll_interval", [None, 0.1], ids=["inotify", "polling"])
def test_a_failure_inside_an_observer_thread_is_logged_and_rescans_and_watching_goes_on(
    tmp_path: Path, captured: LogCapture, monkeypatch: pytest.MonkeyPatch, poll_interval: float | None
) -> None:
    """An exception in the thread that reads inotify events (or polls) ended that thread: no event
    ever again, silently. It is logged, a full rescan is asked for, and the thread goes on."""
    from ckpt_watcher.inotify_observer import DeepSafeWatchGroup
    from ckpt_watcher.observers import LeanTree

    failures = [RuntimeError("a walk failed")]

    def fail_once(original: Any) -> Any:
        def failing(self: Any, *arguments: Any) -> Any:
            if failures:
                raise failures.pop()
            return original(self, *arguments)

        return failing

    if poll_interval is None:  # watchdog's handling of one inotify event raises
        monkeypatch.setattr(DeepSafeWatchGroup, "on_event", fail_once(DeepSafeWatchGroup.on_event))
    else:  # a poll raises
        monkeypatch.setattr(LeanTree, "poll", fail_once(LeanTree.poll))
    watcher = _watcher(tmp_path, poll_interval=poll_interval)
    with RunningWatcher(watcher):
        wait_until(lambda: bool(logged(captured, "watch_started")), what="watch_started")
        (tmp_path / "first-event.txt").write_text("its event is the one that fails")
        wait_until(lambda: bool(logged(captured, "event_handler_failed")), what="event_handler_failed")
        wait_until(
            lambda: any(entry["trigger"] == "full" for entry in logged(captured, "pass_completed")),
            what="a full rescan after the failure",
        )
        for step in range(100, 800, 100):
            write_checkpoint(tmp_path / step_name(0, step))
        wait_until(lambda: _pruned_to_five(tmp_path), what="pruning by events after the failure")
        assert not logged(captured, "worker_error")


def test_an_event_pass_that_raises_is_followed_by_a_full_pass_not_lost_until_the_rescan(
    tmp_path: Path, captured: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The events (and due re-checks) an event pass was to look at are taken from the queue before it
    runs: when it raises, a full pass follows 1 s later (2 s, 4 s while they keep raising), not only
    the periodic rescan (300 s here)."""
    from ckpt_watcher.reconcile import Reconciler, Trigger

    original = Reconciler.run
    failures = [RuntimeError("a pass failed") for _ in range(3)]

    def failing(self: Reconciler, trigger: Trigger, *arguments: Any, **options: Any) -> Any:
        if trigger is not Trigger.STARTUP and failures:
            raise failures.pop()
        return original(self, trigger, *arguments, **options)

    monkeypatch.setattr(Reconciler, "run", failing)
    watcher = _watcher(tmp_path, rescan_seconds=300)
    with RunningWatcher(watcher):
        wait_until(lambda: bool(logged(captured, "watch_started")), what="watch_started")
        for step in range(100, 800, 100):
            write_checkpoint(tmp_path / step_name(0, step))
        wait_until(lambda: _pruned_to_five(tmp_path), what="pruning by the pass after the failures")
    assert not failures
    assert [entry["retry_seconds"] for entry in logged(captured, "worker_error")] == [1.0, 2.0, 4.0]
    assert any(entry["trigger"] == "full" for entry in logged(captured, "pass_completed"))


def test_a_pin_that_cannot_be_read_holds_deletions_until_it_can(
    tmp_path: Path, captured: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint restored from the trash is kept by its pin. A pin that could not be read (EIO, out
    of descriptors) was remembered as unreadable: its checkpoint was planned as never restored, and the
    policy trashed it again. Now the pass stops before its next deletion, says why
    (``storage_unavailable``, retried 1 s, 2 s, ... later: a full pass each, and no event's pass in
    between, nor a busy loop), and the restored checkpoints stay once the pins can be read; the policy
    then does the rest."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\ntrash:\n  grace: 1h\n")
    root = tmp_path / "root"
    for step in range(100, 400, 100):
        write_checkpoint(root / step_name(0, step))
    watcher = Watcher(WatchOptions(root=root, settle_seconds=0, policy_path=policy), load_policy(policy))
    with RunningWatcher(watcher):
        wait_until(lambda: len(logged(captured, "checkpoint_trashed")) == 2, what="the first trashing")
        pins = failing_pin_reads(monkeypatch)
        pins.failing = True
        listing = list_trash(root)
        assert listing is not None
        restore(root, listing.entries)
        write_checkpoint(root / step_name(0, 400))
        wait_until(lambda: bool(logged(captured, "storage_unavailable")), what="the first held pass")
        turns = 0
        work_for = watcher._work_for

        def counted(*arguments: Any) -> Any:
            nonlocal turns
            turns += 1
            return work_for(*arguments)

        monkeypatch.setattr(watcher, "_work_for", counted)
        write_checkpoint(root / step_name(0, 500))  # events while held: left to the retry
        wait_until(lambda: len(logged(captured, "storage_unavailable")) >= 3, what="three held passes")
        failures = logged(captured, "storage_unavailable")[:3]
        assert [record["retry_in"] for record in failures] == [1.0, 2.0, 4.0]
        assert all("a pin of a restored checkpoint is unknown" in record["error"] for record in failures)
        assert len(logged(captured, "checkpoint_trashed")) == 2  # nothing more
        stopped = [record for record in logged(captured, "pass_completed") if record.get("stopped")]
        assert len(stopped) == len(logged(captured, "storage_unavailable"))
        assert {record["trigger"] for record in stopped[1:]} == {"rescan"}
        assert turns < 40  # ~6 s held: a turn a second or so, not a loop that never waits
        pins.failing = False
        wait_until(lambda: len(logged(captured, "checkpoint_trashed")) == 4, what="the policy, pins read")
        # (said once that pass is reported, just after its deletions)
        wait_until(lambda: bool(logged(captured, "storage_restored")), what="storage_restored")
        assert logged(captured, "storage_restored")[0]["failed_attempts"] >= 3

    names = sorted(path.name for path in root.iterdir() if path.suffix == ".ckpt")
    assert names == [step_name(0, 100), step_name(0, 200), step_name(0, 500)]  # restored, and the newest


def test_a_worker_failing_for_hours_keeps_running(
    tmp_path: Path, captured: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backoff after a worker error was ERROR_BACKOFF * 2 ** errors_in_a_row: at the 1,024th error
    in a row (17 hours at a minute each) that no longer converts to a float, and the OverflowError,
    raised in the handler itself, ended the worker. Waits of nothing here, so 1,100 errors take a
    moment."""
    monkeypatch.setattr(daemon_module, "ERROR_BACKOFF", 0.0)
    monkeypatch.setattr(daemon_module, "LONGEST_ERROR_BACKOFF", 0.0)
    watcher = _watcher(tmp_path)
    turns = 0

    def failing_turn() -> None:
        nonlocal turns
        turns += 1
        if turns > 1_100:
            watcher.request_stop()
        raise RuntimeError("a bug no test has seen")

    monkeypatch.setattr(watcher, "_turn", failing_turn)
    watcher.run()

    assert turns == 1_101
    assert len(logged(captured, "worker_error")) == 1_101
    assert logged(captured, "watch_stopped")


def test_a_held_root_waits_for_its_retry_whatever_else_is_due(tmp_path: Path) -> None:
    """While a root is held (its last pass could not read a pin), only its retry runs: a re-check, a
    purge or a poll already due must not make the worker's wait zero, or it would turn without pause
    until the retry, each turn doing nothing."""
    watcher = _watcher(tmp_path)
    now = time.monotonic()
    long_ago = now - 100.0
    reconciler = SimpleNamespace(
        index=SimpleNamespace(next_recheck=lambda: long_ago),
        space=SimpleNamespace(next_check=lambda: long_ago),
        trash=SimpleNamespace(deadline=lambda: long_ago),
    )
    session: Any = SimpleNamespace(
        next_rescan=now + 30.0,
        next_root_check=now + 30.0,
        held_until=now + 30.0,
        reconciler=reconciler,
        root=SimpleNamespace(next_deadline=lambda: long_ago),
    )
    held = watcher._wait_time(cast(Session, session))
    session.held_until = now - 1.0
    free = watcher._wait_time(cast(Session, session))

    assert held > 0.5  # until the retry, the root check or the heartbeat, whichever is first
    assert free == 0.0  # not held: what is due runs now


def test_a_full_rescan_asked_for_while_held_is_the_retry_and_says_so(tmp_path: Path) -> None:
    """While a root is held, a full rescan asked for (a policy edit, an event overflow) waits for the
    retry, which covers everything anyway; it was then logged as the periodic ``rescan``, hiding why
    it ran. The request is kept until the retry, which runs as ``full``."""
    watcher = _watcher(tmp_path)
    now = time.monotonic()
    session: Any = SimpleNamespace(
        next_rescan=now + 30.0,
        next_root_check=now + 30.0,
        held_until=now + 30.0,
        full_rescan_asked=False,
        root=SimpleNamespace(note_unwatched=lambda unwatched: None),
    )
    asked = watcher._work_for(cast(Session, session), Batch(full_rescan=True))
    session.next_rescan = session.held_until = time.monotonic() - 1.0  # the retry is due
    retry = watcher._work_for(cast(Session, session), Batch())
    session.held_until = time.monotonic() + 30.0  # (the retry failed too)
    after = watcher._work_for(cast(Session, session), Batch())

    assert asked is None  # held: no pass before the retry
    assert retry is not None
    assert retry.trigger is Trigger.FULL
    assert after is None  # asked once, run once
    assert not session.full_rescan_asked
