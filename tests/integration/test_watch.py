"""``ckpt-watcher watch`` as a real process: lifecycle, live completeness, policy reload, supervisors."""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher.lock import PROC_LOCKS, holder_in_proc_locks
from ckpt_watcher.session import ROOT_CHECK_INTERVAL
from tests.support.cli import WITHOUT_READ_OVERRIDE, cli_command, run_cli
from tests.support.daemon import DaemonProcess, only_child, running_daemon, wait_until
from tests.support.factories import (
    backdate_tree,
    best_name,
    directory_checkpoint,
    leftovers,
    step_name,
    write_checkpoint,
    zip_bytes,
)
from tests.support.notify_socket import NotifySocket

pytestmark = pytest.mark.timeout(120)


def _names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir() if not path.name.startswith(".ckpt-watcher")}


def _write_policy(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _steps(directory: Path, steps: Iterable[int], epoch: int = 0) -> list[str]:
    names = []
    for step in steps:
        write_checkpoint(directory / step_name(epoch, step))
        names.append(step_name(epoch, step))
    return names


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    return directory


def test_startup_reconcile_then_sigterm_exits_zero(root: Path, tmp_path: Path) -> None:
    _steps(root, range(100, 1100, 100))
    with running_daemon(["watch", str(root), "--settle", "0"], tmp_path / "log") as daemon:
        daemon.wait_ready()
        assert _names(root) == {step_name(0, step) for step in range(600, 1100, 100)}

        code = daemon.stop(signal.SIGTERM)

        assert code == 0
        events = [record["event"] for record in daemon.records()]
        assert events.index("stop_requested") < events.index("watch_stopped") == len(events) - 1
        assert daemon.events("stop_requested")[0]["signal"] == "SIGTERM"
        assert len(daemon.events("checkpoint_deleted")) == 5


def test_sigint_stops_too(root: Path, tmp_path: Path) -> None:
    with running_daemon(["watch", str(root)], tmp_path / "log") as daemon:
        daemon.wait_ready()
        code = daemon.stop(signal.SIGINT)
        assert code == 0


def test_a_stop_and_continue_leaves_the_signals_working(root: Path, tmp_path: Path) -> None:
    """SIGSTOP, then SIGCONT (Ctrl-Z and fg, a debugger attaching) after the signal wait's timeout has
    passed: CPython 3.11 then returns garbage from sigtimedwait, which killed the signal thread, and
    SIGTERM no longer stopped the daemon cleanly (as PID 1, it was ignored)."""
    with running_daemon(["watch", str(root), "--settle", "0"], tmp_path / "log") as daemon:
        daemon.wait_ready()
        for _ in range(3):
            daemon.process.send_signal(signal.SIGSTOP)
            time.sleep(0.5)  # longer than the wait's timeout (SIGNAL_POLL_SECONDS)
            daemon.process.send_signal(signal.SIGCONT)
            time.sleep(0.3)
        _steps(root, range(100, 800, 100))
        wait_until(lambda: len(_names(root)) == 5, what="the worker still pruning")

        code = daemon.stop(signal.SIGTERM)

        assert code == 0
        assert [record["signal"] for record in daemon.events("stop_requested")] == ["SIGTERM"]
        assert daemon.events("watch_stopped")
        assert "Traceback" not in (tmp_path / "log").read_text()


def test_second_instance_is_refused_by_the_lock(root: Path, tmp_path: Path) -> None:
    with running_daemon(["watch", str(root)], tmp_path / "first") as first:
        first.wait_ready()

        second = run_cli("watch", str(root))

        assert second.returncode == 2
        assert f"another ckpt-watcher is already pruning {root} (pid {first.process.pid})" in second.stderr
        assert first.process.poll() is None


def test_new_checkpoints_are_pruned_as_they_are_closed(root: Path, tmp_path: Path) -> None:
    policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: 2\nsave_top_k_best: 1\n")
    arguments = ["--log-level", "debug", "watch", str(root), "--policy", str(policy)]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_ready()
        for step in range(100, 600, 100):
            write_checkpoint(root / step_name(0, step))
            write_checkpoint(root / best_name(0, step, 1.0 / step))

        wait_until(
            lambda: _names(root) == {step_name(0, 400), step_name(0, 500), best_name(0, 500, 1 / 500)},
            what="the newest 2 step and the best checkpoint to remain",
        )
        # Each deletion is logged just after it is done: wait for the seventh record too.
        wait_until(lambda: len(daemon.events("checkpoint_deleted")) == 7, what="7 checkpoint_deleted records")
        deleted = {Path(record["path"]).name for record in daemon.events("checkpoint_deleted")}
        assert deleted == {
            name
            for step in range(100, 600, 100)
            for name in (step_name(0, step), best_name(0, step, 1.0 / step))
        } - {step_name(0, 400), step_name(0, 500), best_name(0, 500, 1 / 500)}
        detected = daemon.events("checkpoint_detected")
        assert {record["kind"] for record in detected} == {"step", "best"}


def test_a_pass_logs_one_summary_line_and_each_detection_only_at_debug(root: Path, tmp_path: Path) -> None:
    """At info, a start-up over many checkpoints is one ``pass_completed`` line that counts what it
    detected (a shared volume of 100,000 checkpoints is not 100,000 lines); each deletion is still
    one record; at debug, each detection is one record too."""
    _steps(root, range(100, 1100, 100))
    arguments = ["watch", str(root), "--settle", "0"]
    with running_daemon(arguments, tmp_path / "info.log") as daemon:
        daemon.wait_ready()
        assert daemon.wait_for("pass_completed")[0]["detected"] == 10
        assert not daemon.events("checkpoint_detected")
        wait_until(lambda: len(daemon.events("checkpoint_deleted")) == 5, what="5 deletion records")
    _steps(root, range(1100, 1300, 100))
    with running_daemon(["--log-level", "debug", *arguments], tmp_path / "debug.log") as daemon:
        daemon.wait_ready()
        assert daemon.wait_for("pass_completed")[0]["detected"] == 7
        assert len(daemon.events("checkpoint_detected")) == 7


def test_path_created_late_is_watched_once_it_appears(tmp_path: Path) -> None:
    root = tmp_path / "not-yet"
    with running_daemon(["watch", str(root), "--settle", "0"], tmp_path / "log") as daemon:
        daemon.wait_for("watch_path_missing")
        root.mkdir()
        daemon.wait_ready()
        _steps(root, range(100, 800, 100))

        wait_until(lambda: len(_names(root)) == 5, what="pruning to 5 in the late directory")
        status = root.stat()  # the late directory itself is locked, by the daemon
        holder = holder_in_proc_locks(PROC_LOCKS.read_text(), status.st_dev, status.st_ino)
        assert holder == daemon.process.pid


def test_path_deleted_and_recreated_is_rearmed(root: Path, tmp_path: Path) -> None:
    with running_daemon(["watch", str(root), "--settle", "0"], tmp_path / "log") as daemon:
        daemon.wait_ready()
        shutil.rmtree(root)
        daemon.wait_for("watch_path_lost")
        root.mkdir()
        daemon.wait_for("watch_rearmed")
        _steps(root, range(100, 800, 100))

        wait_until(lambda: len(_names(root)) == 5, what="pruning to 5 after re-arming")
        assert daemon.process.poll() is None


def test_a_path_recreated_unreadable_is_waited_for_not_an_exit(root: Path, tmp_path: Path) -> None:
    """The root deleted, then recreated with mode 000 (a provisioning step that fixes its owner and mode
    afterwards): it cannot be opened, so it is waited for (said once), and re-armed once it can be."""
    command = [*WITHOUT_READ_OVERRIDE, *cli_command("watch", str(root), "--settle", "0")]
    with running_daemon([], tmp_path / "log", command=command) as daemon:
        daemon.wait_ready()
        shutil.rmtree(root)
        daemon.wait_for("watch_path_lost")
        root.mkdir()
        root.chmod(0)
        try:
            [unusable] = daemon.wait_for("watch_path_unusable")
            time.sleep(1.0)  # several turns of the loop
            assert daemon.process.poll() is None
        finally:
            root.chmod(0o755)
        daemon.wait_for("watch_rearmed")
        _steps(root, range(100, 800, 100))
        wait_until(lambda: len(_names(root)) == 5, what="pruning to 5 after re-arming")
        assert len(daemon.events("watch_path_unusable")) == 1
        assert not daemon.events("watch_lock_unusable")
    assert unusable["error"] == "Permission denied"


def test_a_run_below_a_directory_that_cannot_be_listed_keeps_what_its_link_protects(
    root: Path, tmp_path: Path
) -> None:
    """a/run1/last.ckpt names run2's oldest checkpoint. Once ``a`` could not be listed (its owner made it
    private), the next full rescan did not reach run1 and forgot it with the target its link protected,
    and run2's count rule deleted that at its next save. The groups below a directory that cannot be
    listed stay as last known until it can be listed again or is gone."""
    run1, run2 = root / "a" / "run1", root / "run2"
    _steps(run2, [100, 200])
    run1.mkdir(parents=True)
    os.symlink(f"../../run2/{step_name(0, 100)}", run1 / "last.ckpt")
    policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: 1\n")
    arguments = ("watch", str(root), "--policy", str(policy), "--settle", "0", "--rescan", "1")
    command = [*WITHOUT_READ_OVERRIDE, *cli_command(*arguments)]
    with running_daemon([], tmp_path / "log", command=command) as daemon:
        daemon.wait_ready()
        assert _names(run2) == {step_name(0, 100), step_name(0, 200)}
        (root / "a").chmod(0)
        try:
            rescans = len(daemon.events("pass_completed"))
            daemon.wait_for("pass_completed", lambda record: record["trigger"] == "rescan", count=rescans + 2)
            _steps(run1, [100])  # its writer may still search ``a``: an event names run1
            _steps(run2, [300])
            wait_until(lambda: not (run2 / step_name(0, 200)).exists(), what="run2 pruned")
            assert (run2 / step_name(0, 100)).exists()
        finally:
            (root / "a").chmod(0o755)
        assert daemon.stop() == 0
    assert any(record["path"].endswith("/a") for record in daemon.events("scan_problem"))


@pytest.mark.parametrize("observer", [[], ["--poll-interval", "0.2"]], ids=["inotify", "polling"])
def test_a_link_through_a_repointed_directory_link_protects_its_new_target(
    root: Path, tmp_path: Path, observer: list[str]
) -> None:
    """run1/last.ckpt -> ../latest/<step 100>, ``latest`` a link to run2, re-pointed to run3 (as a
    ``latest`` symlink is moved on): nothing happens in run1, yet its link now reaches run3. A save in
    run3 made an event pass over run3 alone, which planned with run1's remembered target (in run2) and
    deleted run3's step 100, leaving run1/last.ckpt dangling."""
    run1, run2, run3 = root / "run1", root / "run2", root / "run3"
    _steps(run2, [100])
    _steps(run3, [50, 100])
    run1.mkdir()
    os.symlink("run2", root / "latest")
    os.symlink(f"../latest/{step_name(0, 100)}", run1 / "last.ckpt")
    policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: 1\n")
    arguments = ["watch", str(root), "--policy", str(policy), "--settle", "0", *observer]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_ready()
        wait_until(lambda: not (run3 / step_name(0, 50)).exists(), what="run3's start-up prune")
        assert _names(run3) == {step_name(0, 100)}  # run3's newest: kept by the count rule, for now
        os.symlink("run3", root / "latest.new")
        os.rename(root / "latest.new", root / "latest")  # no event in run1
        _steps(run3, [150, 200])  # a save: an event pass over run3 (150 goes by the count rule)

        wait_until(lambda: not (run3 / step_name(0, 150)).exists(), what="run3 pruned after the save")
        assert _names(run3) == {step_name(0, 100), step_name(0, 200)}
        assert (run1 / "last.ckpt").exists()
        assert daemon.stop() == 0


def test_polling_mode_prunes(root: Path, tmp_path: Path) -> None:
    arguments = ["watch", str(root), "--poll", "0.2", "--settle", "0.5"]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_ready()
        assert daemon.events("watch_started")[0]["observer"] == "polling every 0.2 s"
        _steps(root, range(100, 900, 100))

        wait_until(lambda: len(_names(root)) == 5, what="pruning to 5 by polling")
        assert _names(root) == {step_name(0, step) for step in range(400, 900, 100)}


def test_notify_socket_gets_ready_status_watchdog_and_stopping(root: Path, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        environment = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
        with running_daemon(["watch", str(root)], tmp_path / "log", environment) as daemon:
            daemon.wait_ready()
            wait_until(lambda: "READY=1" in notify.lines(), what="READY=1")
            wait_until(lambda: notify.lines().count("WATCHDOG=1") >= 3, what="repeated WATCHDOG=1")
            assert any(line.startswith("STATUS=") for line in notify.lines())

            assert daemon.stop() == 0
            wait_until(lambda: "STOPPING=1" in notify.lines(), what="STOPPING=1")
    finally:
        notify.close()


def test_watchdog_for_another_pid_is_not_answered(root: Path, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        environment = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
        with running_daemon(["watch", str(root)], tmp_path / "log", environment) as daemon:
            daemon.wait_ready()
            wait_until(lambda: "READY=1" in notify.lines(), what="READY=1")
            assert daemon.stop() == 0
        assert "WATCHDOG=1" not in notify.lines()
    finally:
        notify.close()


def test_heartbeat_file_is_touched(root: Path, tmp_path: Path) -> None:
    heartbeat = tmp_path / "heartbeat"
    with running_daemon(["watch", str(root), "--heartbeat", str(heartbeat)], tmp_path / "log") as daemon:
        daemon.wait_ready()
        wait_until(heartbeat.exists, what="the heartbeat file")
        first = heartbeat.stat().st_mtime_ns
        wait_until(lambda: heartbeat.stat().st_mtime_ns > first, timeout=15, what="a second heartbeat")


def test_slow_writer_is_never_counted_until_complete(root: Path, tmp_path: Path) -> None:
    """A big checkpoint streamed over seconds: not deleted, not counted, older ones survive meanwhile."""
    policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: 2\n")
    _steps(root, [100, 200])
    big = zip_bytes(os.urandom(1 << 20), entries=24)  # ~24 MiB, written in 64 KiB chunks
    target = root / step_name(0, 300)
    arguments = ["--log-level", "debug", "watch", str(root), "--policy", str(policy), "--settle", "1"]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_ready()
        with target.open("wb") as stream:
            for offset in range(0, len(big), 1 << 16):
                stream.write(big[offset : offset + (1 << 16)])
                stream.flush()
                os.fsync(stream.fileno())
                if offset % (1 << 21) == 0:
                    time.sleep(0.1)
                    assert (root / step_name(0, 100)).exists(), "an older checkpoint went mid-write"
                    assert target.exists(), "the checkpoint being written was deleted"
            daemon.wait_for(
                "checkpoint_detected",
                lambda record: record["path"].endswith(step_name(0, 300)) and record["complete"] is False,
            )
            assert not daemon.events("checkpoint_deleted")

        daemon.wait_for("checkpoint_deleted", lambda record: record["path"].endswith(step_name(0, 100)))
        wait_until(lambda: _names(root) == {step_name(0, 200), step_name(0, 300)}, what="200 and 300 kept")


def test_atomic_writer_moving_into_place_is_counted_at_once(root: Path, tmp_path: Path) -> None:
    """A temp file in another directory renamed into place, as Lightning's atomic save does.

    The rename is atomic, so the file counts at once: with a settle time of 10 minutes, only that
    can make the deletion happen within the test's deadline.
    """
    staging = tmp_path / "staging"
    staging.mkdir()
    an_hour_ago = time.time() - 3600
    for name in _steps(root, range(100, 600, 100)):
        os.utime(root / name, (an_hour_ago, an_hour_ago))  # settled long ago
    with running_daemon(["watch", str(root), "--settle", "600"], tmp_path / "log") as daemon:
        daemon.wait_ready()
        temporary = write_checkpoint(staging / "tmpabc123")
        os.rename(temporary, root / step_name(0, 600))

        daemon.wait_for("checkpoint_deleted", lambda record: record["path"].endswith(step_name(0, 100)))
        assert _names(root) == {step_name(0, step) for step in range(200, 700, 100)}


def test_temporary_names_in_the_directory_are_never_counted(root: Path, tmp_path: Path) -> None:
    _steps(root, range(100, 600, 100))
    arguments = ["--log-level", "debug", "watch", str(root), "--settle", "0"]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_ready()
        write_checkpoint(root / (step_name(0, 600) + ".tmp"))
        write_checkpoint(root / (step_name(0, 700) + ".partial"))
        write_checkpoint(root / step_name(0, 800))
        (root / "epoch=00-step=000800-train-unfinished").touch()

        daemon.wait_for("checkpoint_detected", lambda record: record["path"].endswith(step_name(0, 800)))
        time_limit = time.monotonic() + 1.0
        while time.monotonic() < time_limit:
            assert _names(root) >= {step_name(0, step) for step in range(100, 600, 100)}
            time.sleep(0.05)
        assert not daemon.events("checkpoint_deleted")


class TestPolicyReload:
    """Edits of every kind: the valid ones apply at once, the broken ones never stop the daemon."""

    def test_rename_replace_edit_is_applied(self, root: Path, tmp_path: Path) -> None:
        policy = _write_policy(tmp_path / "conf" / "policy.yaml", "save_top_k_checkpoints: 5\n")
        _steps(root, range(100, 900, 100))
        with running_daemon(["watch", str(root), "--policy", str(policy)], tmp_path / "log") as daemon:
            daemon.wait_ready()
            wait_until(lambda: len(_names(root)) == 5)

            replacement = _write_policy(tmp_path / "conf" / ".policy.yaml.swp", "save_top_k_checkpoints: 2\n")
            os.replace(replacement, policy)

            reloaded = daemon.wait_for("policy_reloaded")[0]
            assert reloaded["changes"] == {"save_top_k_checkpoints": {"old": 5, "new": 2}}
            wait_until(lambda: _names(root) == {step_name(0, 700), step_name(0, 800)})

    def test_milestones_added_by_an_edit_are_kept_from_the_next_pass(
        self, root: Path, tmp_path: Path
    ) -> None:
        policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: -1\n")
        _steps(root, range(100, 900, 100))
        with running_daemon(["watch", str(root), "--policy", str(policy)], tmp_path / "log") as daemon:
            daemon.wait_ready()
            assert len(_names(root)) == 8
            policy.write_text("save_top_k_checkpoints: 2\nkeep_every_n_steps: 400\n")

            reloaded = daemon.wait_for("policy_reloaded")[0]
            assert reloaded["changes"]["keep_every_n_steps"] == {"old": None, "new": 400}  # as written
            wait_until(lambda: _names(root) == {step_name(0, step) for step in (400, 700, 800)})
            assert daemon.stop() == 0
        deleted = {Path(record["path"]).name for record in daemon.events("checkpoint_deleted")}
        assert deleted == {step_name(0, step) for step in (100, 200, 300, 500, 600)}

    def test_in_place_edit_is_applied(self, root: Path, tmp_path: Path) -> None:
        policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: 5\n")
        _steps(root, range(100, 900, 100))
        with running_daemon(["watch", str(root), "--policy", str(policy)], tmp_path / "log") as daemon:
            daemon.wait_ready()
            with policy.open("r+") as stream:
                stream.seek(0)
                stream.write("save_top_k_checkpoints: 3\n")
                stream.truncate()

            daemon.wait_for("policy_reloaded")
            wait_until(lambda: len(_names(root)) == 3)

    def test_a_half_written_edit_dated_long_past_is_read_only_once_left_alone(
        self, root: Path, tmp_path: Path
    ) -> None:
        """A policy re-saved in place by a writer whose clock is behind (another machine on NFS) is
        dated long past while it is written. Taken as quiet by that time, the partial file was read at
        the daemon's next look, and its default (5 step checkpoints) deleted 3 that the policy keeps.
        An edit is read once the daemon's own clock has seen it unchanged for the quiet time."""
        policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_best: 20\nsave_top_k_checkpoints: 10\n")
        _steps(root, range(100, 900, 100))
        long_past = time.time() - 3600
        with running_daemon(["watch", str(root), "--policy", str(policy)], tmp_path / "log") as daemon:
            daemon.wait_ready()
            with policy.open("r+") as stream:
                stream.truncate(0)
                stream.write("save_top_k_best: 20\n")  # half-way: the count key not written yet
                stream.flush()
                os.utime(policy, (long_past, long_past))
                time.sleep(2 * ROOT_CHECK_INTERVAL)  # the writer's pause: the daemon looks meanwhile
                stream.write("save_top_k_checkpoints: 6\n")
            os.utime(policy, (long_past + 1, long_past + 1))

            reloaded = daemon.wait_for("policy_reloaded")[0]
            wait_until(lambda: len(_names(root)) == 6)
            assert daemon.stop() == 0
        assert reloaded["changes"] == {"save_top_k_checkpoints": {"old": 10, "new": 6}}
        assert len(daemon.events("policy_reloaded")) == 1
        deleted = {Path(record["path"]).name for record in daemon.events("checkpoint_deleted")}
        assert deleted == {step_name(0, 100), step_name(0, 200)}

    def test_invalid_edit_is_rejected_and_the_old_policy_stays(self, root: Path, tmp_path: Path) -> None:
        policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: 3\n")
        with running_daemon(["watch", str(root), "--policy", str(policy)], tmp_path / "log") as daemon:
            daemon.wait_ready()
            policy.write_text("save_top_k_checkpoints: 3.5\nsave_top_k_best: yes please\n")

            rejected = daemon.wait_for("policy_rejected")[0]
            assert rejected["problems"] == [
                "At 'save_top_k_checkpoints': expected a whole number, got 3.5 (a number with a fraction)",
                "At 'save_top_k_best': expected a whole number, got 'yes please' (a string)",
            ]
            _steps(root, range(100, 700, 100))
            wait_until(lambda: len(_names(root)) == 3, what="the old policy (3) still applied")

            policy.write_text("save_top_k_checkpoints: [\n")
            daemon.wait_for("policy_rejected", count=2)
            assert daemon.process.poll() is None

    def test_deleted_policy_keeps_the_last_good_one(self, root: Path, tmp_path: Path) -> None:
        policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: 2\n")
        with running_daemon(["watch", str(root), "--policy", str(policy)], tmp_path / "log") as daemon:
            daemon.wait_ready()
            policy.unlink()
            daemon.wait_for("policy_missing")
            _steps(root, range(100, 600, 100))
            wait_until(lambda: len(_names(root)) == 2, what="the last good policy (2) still applied")

    def test_a_policy_saved_by_renaming_the_old_file_aside_first_is_never_missing(
        self, root: Path, tmp_path: Path
    ) -> None:
        """An editor's save that moves the old file aside and then writes the new one (vim's backup
        copy, ``backupcopy=no``), for the policy and the training config it protects from: each is
        missing for a moment, which said ``policy_missing`` and ``protection_rejected`` (an error a
        team alerts on) for a save. A file gone for good still says so (the test above)."""
        policy = _write_policy(
            tmp_path / "policy.yaml", "save_top_k_checkpoints: 2\nprotect_from: [train.yaml]\n"
        )
        train = tmp_path / "train.yaml"
        train.write_text(f"ckpt_path: {root / 'none.ckpt'}\n")
        with running_daemon(["watch", str(root), "--policy", str(policy)], tmp_path / "log") as daemon:
            daemon.wait_ready()
            for path, text in (
                (train, f"ckpt_path: {root / 'other.ckpt'}\n"),
                (policy, "save_top_k_checkpoints: 3\nprotect_from: [train.yaml]\n"),
            ):
                path.rename(path.with_name(path.name + "~"))
                time.sleep(0.5)  # (the editor writing the new file: well past the daemon's batching)
                path.write_text(text)
            daemon.wait_for("policy_reloaded")
            daemon.wait_for("protection_reloaded")
            _steps(root, range(100, 600, 100))
            wait_until(lambda: len(_names(root)) == 3, what="the new policy (3) applied")
            assert not daemon.events("policy_missing")
            assert not daemon.events("protection_rejected")

    def test_a_policy_directory_made_unsearchable_is_a_rejected_edit(
        self, root: Path, tmp_path: Path
    ) -> None:
        """The policy's directory chmod'ed to 000 under a running daemon: Path.exists raised EACCES and
        the worker logged a traceback (worker_error). It is a refused edit saying why; the last good
        policy stays, and the file is read again once it can be."""
        configs = tmp_path / "configs"
        policy = _write_policy(configs / "policy.yaml", "save_top_k_checkpoints: 2\n")
        command = [*WITHOUT_READ_OVERRIDE, *cli_command("watch", str(root), "--policy", str(policy))]
        with running_daemon([], tmp_path / "log", command=command) as daemon:
            daemon.wait_ready()
            configs.chmod(0)
            try:
                [rejected] = daemon.wait_for("policy_rejected")
                _steps(root, range(100, 600, 100))
                wait_until(lambda: len(_names(root)) == 2, what="the last good policy (2) still applied")
            finally:
                configs.chmod(0o755)
            policy.write_text("save_top_k_checkpoints: 3\n")
            daemon.wait_for("policy_reloaded")
            _steps(root, range(600, 800, 100))
            wait_until(lambda: len(_names(root)) == 3)
            assert not daemon.events("worker_error")
            assert not daemon.events("policy_missing")
        assert "Permission denied" in " ".join(rejected["problems"])

    def test_configmap_style_symlink_swap_is_applied(self, root: Path, tmp_path: Path) -> None:
        """Kubernetes mounts a ConfigMap as policy.yaml -> ..data/policy.yaml, ..data -> ..<timestamp>."""
        mount = tmp_path / "configmap"
        first = _write_policy(
            mount / "..2026_11_28_00_00_00.1" / "policy.yaml", "save_top_k_checkpoints: 4\n"
        )
        os.symlink(first.parent.name, mount / "..data")
        os.symlink("..data/policy.yaml", mount / "policy.yaml")
        _steps(root, range(100, 900, 100))
        policy = mount / "policy.yaml"
        with running_daemon(["watch", str(root), "--policy", str(policy)], tmp_path / "log") as daemon:
            daemon.wait_ready()
            wait_until(lambda: len(_names(root)) == 4)

            second = _write_policy(
                mount / "..2026_11_28_00_05_00.2" / "policy.yaml", "save_top_k_checkpoints: 1\n"
            )
            os.symlink(second.parent.name, mount / "..data_tmp")
            os.replace(mount / "..data_tmp", mount / "..data")
            shutil.rmtree(first.parent)

            daemon.wait_for("policy_reloaded")
            wait_until(lambda: _names(root) == {step_name(0, 800)})

    def test_sighup_rereads_the_policy(self, root: Path, tmp_path: Path) -> None:
        policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: 4\n")
        notify = NotifySocket(tmp_path / "notify.sock")
        try:
            environment = {"NOTIFY_SOCKET": str(notify.path)}
            arguments = ["watch", str(root), "--policy", str(policy)]
            with running_daemon(arguments, tmp_path / "log", environment) as daemon:
                daemon.wait_ready()
                daemon.send(signal.SIGHUP)

                daemon.wait_for("reload_requested")
                daemon.wait_for("policy_unchanged")
                wait_until(lambda: "RELOADING=1" in notify.lines(), what="RELOADING=1")
                reloading = notify.lines().index("RELOADING=1")
                assert notify.lines()[reloading + 1].startswith("MONOTONIC_USEC=")
                assert "READY=1" in notify.lines()[reloading:]
                assert daemon.process.poll() is None
        finally:
            notify.close()


def test_immutable_file_failure_is_logged_and_retried(root: Path, tmp_path: Path) -> None:
    """A deletion the OS refuses (chattr +i stands in for EPERM/EROFS): logged at error once, not at
    every pass while it fails the same way (each still counts in the pass's failed), and the daemon
    keeps running."""
    _steps(root, range(100, 700, 100))
    stuck = root / step_name(0, 100)
    if subprocess.run(["chattr", "+i", str(stuck)], check=False, capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this file system")
    try:
        with running_daemon(
            ["watch", str(root), "--settle", "0", "--rescan", "1"], tmp_path / "log"
        ) as daemon:
            daemon.wait_ready()
            failures = daemon.wait_for("checkpoint_delete_failed")
            assert failures[0]["error"] == "Operation not permitted"
            assert failures[0]["level"] == "error"
            daemon.wait_for("pass_completed", lambda record: record["failed"] == 1, count=3)  # retried
            assert len(daemon.events("checkpoint_delete_failed")) == 1, "a repeat is at debug"
            assert daemon.process.poll() is None

            subprocess.run(["chattr", "-i", str(stuck)], check=True)
            daemon.wait_for("checkpoint_deleted", lambda record: record["path"].endswith(stuck.name))
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=False, capture_output=True)


def test_daemon_as_pid_1_stops_on_sigterm(root: Path, tmp_path: Path) -> None:
    """In a container the daemon is PID 1, for which the kernel drops signals with no handler."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    command = ["unshare", "--pid", "--fork", "--kill-child", *cli_command()]
    daemon = DaemonProcess(["watch", str(root)], tmp_path / "log", command=command)
    try:
        daemon.wait_ready()
        child = only_child(daemon.process.pid)
        os.kill(child, signal.SIGTERM)  # signal the daemon itself, PID 1 of its namespace
        assert daemon.process.wait(timeout=30) == 0
        assert [record["signal"] for record in daemon.events("stop_requested")] == ["SIGTERM"]
        assert daemon.events("watch_stopped")
    finally:
        daemon.close()


_HUNG_WORKER = """
import sys, time
from ckpt_watcher.supervisor import supervise
from ckpt_watcher.logs import configure_logging
from ckpt_watcher.notify import Notifier

class HungWatcher:
    notifier = Notifier({})
    exit_code = 0
    def run(self):
        print("worker-started", flush=True)
        while True:  # a worker stuck in I/O that never sees the stop request
            time.sleep(0.05)
    def request_stop(self):
        pass
    def request_reload(self):
        pass

configure_logging()
sys.exit(supervise(HungWatcher()))
"""


def test_second_signal_forces_exit_when_the_worker_hangs(tmp_path: Path) -> None:
    log = (tmp_path / "log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", _HUNG_WORKER], stdout=subprocess.PIPE, stderr=log, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "worker-started"
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: "stop_requested" in (tmp_path / "log").read_text(), what="the first signal")
        assert process.poll() is None, "the hung worker should keep the process alive after one signal"

        process.send_signal(signal.SIGTERM)

        assert process.wait(timeout=10) == 128 + signal.SIGTERM
        assert "forced_exit" in (tmp_path / "log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        log.close()


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["checkpoint_detected", "checkpoint_deleted"])
def test_sigterm_during_a_large_startup_reconcile_stops_between_deletions(
    root: Path, tmp_path: Path, moment: str
) -> None:
    """One directory of 20,000 checkpoints: a stop signal is honoured in the middle of its one group."""
    count = 20_000
    data = zip_bytes()
    for step in range(1, count + 1):
        (root / step_name(0, step)).write_bytes(data)
    arguments = ["--log-level", "debug", "watch", str(root), "--settle", "0"]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_for(moment, timeout=120)
        daemon.send(signal.SIGTERM)
        assert daemon.process.wait(timeout=120) == 0
        assert daemon.events("watch_stopped")
        deleted = len(daemon.events("checkpoint_deleted"))
    planned = count - 5
    assert deleted < planned // 2, f"{deleted} of {planned} planned deletions were done after SIGTERM"
    assert len(_names(root)) == count - deleted


def _many_small_files(checkpoint: Path, files: int) -> None:
    """A DeepSpeed checkpoint's ZeRO shards, many and small (what takes long to remove is their number)."""
    for index in range(files // 1000):
        shards = checkpoint / "checkpoint" / f"d{index:03d}"
        shards.mkdir()
        for number in range(1000):
            os.close(os.open(shards / f"zero_pp_rank_{number}_optim_states.pt", os.O_CREAT | os.O_WRONLY))


@pytest.mark.slow
def test_sigterm_while_a_huge_directory_checkpoint_is_removed_leaves_a_leftover_the_next_start_finishes(
    root: Path, tmp_path: Path
) -> None:
    """SIGTERM once the checkpoint was renamed out of the way: its removal stops there (the daemon
    removed all of its 300,000 files first); what remains is a leftover, never a checkpoint under its
    own name, and the next start finishes it."""
    run = root / "run"
    old = directory_checkpoint(run / step_name(0, 100))
    _many_small_files(old, 60_000)
    newer = directory_checkpoint(run / step_name(0, 200))
    backdate_tree(root)
    policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: 1\nsave_top_k_best: 1\n")
    arguments = ["watch", str(root), "--policy", str(policy), "--settle", "0"]
    with running_daemon(arguments, tmp_path / "first") as daemon:
        wait_until(lambda: bool(leftovers(run)), timeout=120, what="the checkpoint renamed out of the way")
        daemon.send(signal.SIGTERM)
        assert daemon.process.wait(timeout=120) == 0
        [interrupted] = daemon.events("removal_interrupted")
        assert daemon.events("checkpoint_deleted") == daemon.events("checkpoint_delete_failed") == []

    [leftover] = leftovers(run)
    assert not old.exists()
    assert interrupted["path"] == str(old)
    assert interrupted["left_as"] == str(run / leftover)
    assert next((run / leftover).rglob("zero_pp_rank_*"), None) is not None  # not removed in full
    with running_daemon(arguments, tmp_path / "second") as daemon:
        daemon.wait_ready(timeout=120)
        assert [record["path"] for record in daemon.events("leftover_removed")] == [str(run / leftover)]
        assert daemon.stop() == 0

    assert sorted(os.listdir(run)) == [newer.name]


def _in_user_namespace_with_inotify_watches(limit: int) -> list[str]:
    """A command prefix: a new user namespace whose own inotify watch limit is ``limit``.

    ``max_inotify_watches`` is counted per user namespace, so the test exhausts its own limit and
    never the machine's (other tests run concurrently).
    """
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    script = f'echo {limit} > /proc/sys/user/max_inotify_watches && exec "$0" "$@"'
    probe = subprocess.run(["unshare", "-Ur", "sh", "-c", script, "true"], check=False, capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot set a user namespace's inotify limit here: {probe.stderr.decode().strip()}")
    return ["unshare", "-Ur", "sh", "-c", script, *cli_command()]


def test_new_directories_beyond_the_inotify_watch_limit_are_polled(root: Path, tmp_path: Path) -> None:
    """Watches run out for new run directories: warned about, polled, and watched again once possible."""
    for run in ("run-a", "run-b"):
        (root / run).mkdir()
    command = _in_user_namespace_with_inotify_watches(limit=5)  # the root and two runs take 3
    arguments = ["watch", str(root), "--settle", "0", "--rescan", "300"]
    daemon = DaemonProcess(arguments, tmp_path / "log", command=command)
    try:
        daemon.wait_ready()
        late = [root / f"late-{index}" for index in range(4)]
        for directory in late:
            directory.mkdir()
        warning = daemon.wait_for("inotify_unavailable", timeout=30)[0]
        assert warning["subtree"] in {str(directory) for directory in late}
        unwatched = Path(warning["subtree"])

        _steps(unwatched, range(100, 800, 100))
        wait_until(lambda: len(_names(unwatched)) == 5, timeout=30, what="pruning of the polled subtree")

        for directory in late:
            if directory != unwatched:
                shutil.rmtree(directory)
        daemon.wait_for("inotify_restored", lambda record: record["subtree"] == str(unwatched), timeout=30)
        assert daemon.process.poll() is None
    finally:
        daemon.close()


def test_an_unreadable_directory_is_reported_once_per_pass(root: Path, tmp_path: Path) -> None:
    locked = root / "locked"
    locked.mkdir()
    _steps(root / "readable", range(100, 800, 100))
    locked.chmod(0)
    try:
        command = [*WITHOUT_READ_OVERRIDE, *cli_command("watch", str(root), "--settle", "0")]
        with running_daemon([], tmp_path / "log", command=command) as daemon:
            daemon.wait_ready()
            assert [problem["path"] for problem in daemon.events("scan_problem")] == [str(locked)]
            assert len(_names(root / "readable")) == 5
    finally:
        locked.chmod(0o755)


def _logged_after(moment: datetime.datetime) -> Callable[[dict[str, Any]], bool]:
    return lambda record: datetime.datetime.fromisoformat(record["timestamp"]) >= moment


def test_a_last_link_being_replaced_keeps_protecting_its_target(root: Path, tmp_path: Path) -> None:
    """Lightning replaces a ``save_last="link"`` symlink by unlink + symlink; one listing in between
    must not take the protection of its target away. The absence is trusted only once re-checked.

    What each pass did is read from the log, not from the disk when the test gets to look: the
    re-check comes about a second after the first listing without the link, and a test process
    that does not run for that long (a loaded machine) would find the target rightly deleted."""
    policy = _write_policy(tmp_path / "policy.yaml", "save_top_k_checkpoints: 1\n")
    _steps(root, [100, 200, 300])
    link = root / "last.ckpt"
    os.symlink(step_name(0, 200), link)
    arguments = ["--log-level", "debug", "watch", str(root), "--policy", str(policy), "--settle", "0"]
    with running_daemon(arguments, tmp_path / "log") as daemon:
        daemon.wait_ready()
        assert _names(root) == {step_name(0, 200), step_name(0, 300), "last.ckpt"}

        unlinked_at = datetime.datetime.now(datetime.UTC)
        link.unlink()
        # The first pass whose listing missed the link: one that listed it (a pass logged after the
        # unlink may have listed before it) keeps 3, last.ckpt included.
        first = daemon.wait_for(
            "pass_completed",
            lambda record: (
                record["trigger"] == "event" and _logged_after(unlinked_at)(record) and record["kept"] < 3
            ),
        )[0]
        assert (first["kept"], first["deleted"]) == (2, 0), "one listing without last.ckpt dropped its target"

        daemon.wait_for("checkpoint_deleted", lambda record: record["path"].endswith(step_name(0, 200)))
        assert _names(root) == {step_name(0, 300)}


def test_a_resume_path_the_watcher_may_not_look_into_is_a_warning_not_a_failed_pass(
    root: Path, tmp_path: Path
) -> None:
    """A training config's ckpt_path (and --protect) naming a file in a directory the watcher may not
    search (the trainer's home, mode 700): Path.exists raises EACCES there. It is a warning saying so;
    the start-up pass runs, READY comes, and the group is pruned (the path stays pinned as written)."""
    secret = tmp_path / "secret"
    secret.mkdir()
    _steps(root, [100, 200, 300, 400])
    policy = _write_policy(
        tmp_path / "policy.yaml", "save_top_k_checkpoints: 2\nprotect_from: [train.yaml]\n"
    )
    (tmp_path / "train.yaml").write_text(f"ckpt_path: {secret / 'last.ckpt'}\n")
    secret.chmod(0)
    try:
        command = [
            *WITHOUT_READ_OVERRIDE,
            *cli_command(
                "watch",
                str(root),
                "--policy",
                str(policy),
                "--settle",
                "0",
                "--protect",
                str(secret / "a.ckpt"),
            ),
        ]
        with running_daemon([], tmp_path / "log", command=command) as daemon:
            daemon.wait_ready()
            warnings = [record["message"] for record in daemon.events("protection_warning")]
            missing = [record["detail"] for record in daemon.events("protected_path_missing")]
            failures = daemon.events("worker_error")
        pruned = run_cli(
            "prune", str(root), "--policy", str(policy), "--dry-run", prefix=WITHOUT_READ_OVERRIDE
        )
    finally:
        secret.chmod(0o755)

    assert not failures
    assert _names(root) == {step_name(0, 300), step_name(0, 400)}
    [warning] = warnings
    [detail] = missing
    assert "which cannot be looked at (Permission denied)" in warning
    assert "which cannot be looked at (Permission denied)" in detail
    assert pruned.returncode == 0, pruned.stderr
    assert "Traceback" not in pruned.stderr


def test_a_root_replaced_by_a_symlink_is_never_followed(root: Path, tmp_path: Path) -> None:
    """A review: the root moved aside and a symlink to another tree put in its place, the daemon re-armed
    on the symlink's target and pruned checkpoints that were never under the watched root. A root that
    leads elsewhere than where it was first watched (or is a symlink now) is waited for, said once,
    and watched again once it is that directory again."""
    elsewhere = tmp_path / "elsewhere"
    _steps(elsewhere, range(100, 900, 100))
    with running_daemon(["watch", str(root), "--settle", "0"], tmp_path / "log") as daemon:
        daemon.wait_ready()
        root.rename(tmp_path / "root.aside")
        root.symlink_to(elsewhere)
        daemon.wait_for("watch_path_lost")
        [unusable] = daemon.wait_for("watch_path_unusable")
        time.sleep(1.5)  # (several turns of the loop)
        assert len(_names(elsewhere)) == 8
        assert not daemon.events("watch_rearmed")
        assert not daemon.events("checkpoint_deleted")
        root.unlink()
        (tmp_path / "root.aside").rename(root)
        daemon.wait_for("watch_rearmed")
        _steps(root, range(100, 800, 100))
        wait_until(lambda: len(_names(root)) == 5, what="pruning to 5 after re-arming")
        assert len(daemon.events("watch_path_unusable")) == 1
    assert unusable["error"] == f"it now leads to {elsewhere}, through a symlink"
    assert len(_names(elsewhere)) == 8


def _write_in_two_chunks(path: Path, first: str, rest: str) -> None:
    """A writer that flushes part of a file and finishes it a second later."""
    with path.open("w") as handle:
        handle.write(first)
        handle.flush()
        time.sleep(1.0)
        handle.write(rest)


def test_a_per_run_file_written_after_one_was_removed_is_read_only_once_whole(
    root: Path, tmp_path: Path
) -> None:
    """A review: once a removed per-run file had been gone for its quiet time, a new one was read at
    its first look again, half-written ("save_top_k_checkpoints: 1" of a "10"), and four
    checkpoints were deleted. A file that appears after one was removed waits as a new one does."""
    run = root / "run"
    written = _steps(run, range(100, 600, 100))
    per_run = run / ".ckpt-watcher.yaml"
    per_run.write_text("save_top_k_checkpoints: 10\n")
    with running_daemon(["watch", str(root), "--settle", "0"], tmp_path / "log") as daemon:
        daemon.wait_ready()
        per_run.unlink()
        daemon.wait_for("policy_override_removed")
        time.sleep(2.5)  # (gone for good: its directory is on the policy above, which keeps 5)
        _write_in_two_chunks(per_run, "save_top_k_checkpoints: 1", "0\n")
        time.sleep(3.5)  # (the file quiet, read whole, and a pass under it)
        assert _names(run) == set(written)
        assert not daemon.events("checkpoint_deleted")
        assert daemon.events("group_blocked")


def test_a_new_per_run_file_above_the_runs_applies_to_them_once_quiet(root: Path, tmp_path: Path) -> None:
    """A review: a new per-run file in a directory above the runs blocked them while it was left
    unread, then only its own directory was looked at again once it was quiet: the runs below stayed
    blocked until the next full rescan (5 minutes by default). Every group below it is looked at."""
    run = root / "exp" / "run1"
    _steps(run, range(100, 400, 100))
    with running_daemon(["watch", str(root), "--settle", "0"], tmp_path / "log") as daemon:
        daemon.wait_ready()
        (root / "exp" / ".ckpt-watcher.yaml").write_text("save_top_k_checkpoints: 1\n")
        blocked = daemon.wait_for("group_blocked", count=2)
        wait_until(lambda: len(_names(run)) == 1, timeout=20, what="run1 pruned to 1 under the new file")
        assert not [record for record in daemon.events("pass_completed") if record["trigger"] == "rescan"]
    assert {record["directory"] for record in blocked} == {str(root / "exp"), str(run)}
