"""``watch`` keeping a real file system's free space (a tmpfs mounted for each test; no mocked statvfs):
a writer saving checkpoints one after another never gets ENOSPC, a slow writer's growing checkpoint
makes room while it is still being written, ``keep_free`` and ``max_size`` hot-reload, and
``budget_unmet`` is logged once per change, not every pass.

No test measures time: each waits for a state with a generous deadline, and the order of events is
read from the daemon's own log (how fast it reacts is measured in bench/space.py)."""

from __future__ import annotations

import datetime
import errno
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, running_daemon, wait_until
from tests.support.factories import step_name, zip_bytes
from tests.support.tmpfs import MIB, free_bytes, mounted_tmpfs

pytestmark = pytest.mark.timeout(240)

CHUNK = 256 * 1024


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs holding the checkpoint root ``ckpt``."""
    with mounted_tmpfs(tmp_path / "disk", 64 * MIB) as mount:
        root = mount / "ckpt"
        root.mkdir()
        yield root


class WriterError(AssertionError):
    """The writer got an error (ENOSPC is the one this file is about)."""


def save(path: Path, data: bytes, *, pause: float = 0.0) -> float:
    """Write ``data`` to ``path`` as a trainer does (open, write chunk by chunk, close); return the
    wall-clock time of the close. ``pause`` sleeps between chunks (a slow writer)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for start in range(0, len(data), CHUNK):
            try:
                os.write(descriptor, data[start : start + CHUNK])
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    raise WriterError(f"ENOSPC writing {path.name} at byte {start}") from None
                raise
            if pause:
                time.sleep(pause)
    finally:
        os.close(descriptor)
    return time.time()


def allocated(path: Path) -> int:
    """The bytes a file takes on disk (whole blocks)."""
    return os.stat(path).st_blocks * 512


def at_least(disk: Path, free: int) -> Callable[[], bool]:
    """A condition: ``disk`` has ``free`` bytes free."""
    return lambda: free_bytes(disk) >= free


def timestamp(record: dict[str, object]) -> float:
    text = str(record["timestamp"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(text).timestamp()


def watch(root: Path, policy: Path, log: Path, *options: str) -> DaemonProcess:
    return DaemonProcess(["watch", str(root), "--policy", str(policy), *options], log)


MODES = {"inotify": ("--settle", "0"), "poll": ("--poll-interval", "0.5", "--settle", "0")}


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_writer_saving_one_checkpoint_after_another_never_runs_out_of_space(
    disk: Path, tmp_path: Path, mode: str
) -> None:
    keep_free = 16 * MIB
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: -1\nkeep_free: 16MiB\n")
    data = zip_bytes(os.urandom(4 * MIB))
    run = disk / "run"
    run.mkdir()
    saves = 24  # 96 MiB of checkpoints through a 64 MiB file system
    with running_daemon(
        ["watch", str(disk), "--policy", str(policy), *MODES[mode]], tmp_path / "log"
    ) as daemon:
        daemon.wait_ready()
        after_save: list[int] = []
        after_room: list[int] = []
        for index in range(saves):
            path = run / step_name(0, 100 * (index + 1))
            save(path, data)  # raises WriterError on ENOSPC
            after_save.append(free_bytes(disk))
            size = allocated(path)
            # the trainer trains before its next save; the daemon makes room for that save meanwhile
            wait_until(at_least(disk, keep_free + size), 60, "room for the next save")
            after_room.append(free_bytes(disk))
        deletions = daemon.events("checkpoint_deleted")
        assert daemon.stop() == 0
    assert all(free >= keep_free for free in after_save), [free / MIB for free in after_save]
    # No more than needed: from the first save that left less than keep_free + the next save (the disk
    # is full from then on; the daemon may already have evicted while a later save was being written),
    # never a whole checkpoint more free than keep_free + the next save.
    first_full = next(index for index, saved in enumerate(after_save) if saved < keep_free + size)
    assert first_full <= saves - 10, "64 MiB fill up within the first 14 saves of 4 MiB"
    full = after_room[first_full:]
    assert all(free < keep_free + 2 * size for free in full), [free / MIB for free in full]
    assert len(deletions) >= saves - 10
    assert all(record["reasons"][0].startswith("evicted for space: ") for record in deletions)
    kept = sorted(path.name for path in run.iterdir())
    assert kept[-1] == step_name(0, 100 * saves)
    assert daemon.events("budget_unmet") == []


@pytest.mark.slow
def test_a_slow_writer_gets_room_while_its_checkpoint_is_still_being_written(
    disk: Path, tmp_path: Path
) -> None:
    old = disk / "old-run"
    old.mkdir()
    for index in range(6):  # 6 x 4 MiB, written long ago
        path = old / step_name(0, 100 * (index + 1))
        path.write_bytes(zip_bytes(bytes(4 * MIB)))
        stamp = time.time() - 3600 + index
        os.utime(path, (stamp, stamp))
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: -1\nkeep_free: 12MiB\n")
    new = disk / "new-run"
    new.mkdir()
    big = zip_bytes(os.urandom(44 * MIB))  # the first save of a new run, far larger than any before
    assert len(big) > free_bytes(disk), "without eviction the writer would run out of space"
    with running_daemon(["watch", str(disk), "--policy", str(policy)], tmp_path / "log") as daemon:
        daemon.wait_ready()
        assert daemon.events("checkpoint_deleted") == []  # room enough before the save starts
        closed = save(new / step_name(0, 100), big, pause=0.08)  # ~3 MiB/s
        daemon.wait_for("pass_completed", lambda record: record["trigger"] == "event" and record["kept"] >= 1)
        deletions = daemon.events("checkpoint_deleted")
        assert daemon.stop() == 0
    assert deletions, "nothing was evicted"
    assert timestamp(deletions[0]) < closed  # evicted while the checkpoint was still being written
    assert all(Path(str(record["path"])).parent == old for record in deletions)
    assert [Path(str(record["path"])).name for record in deletions] == [
        step_name(0, 100 * (index + 1)) for index in range(len(deletions))
    ]  # oldest first
    assert (old / step_name(0, 600)).exists()  # old-run's newest: never evicted
    space_passes = [record for record in daemon.events("pass_completed") if record["trigger"] == "space"]
    assert space_passes, "the eviction came from a free-space check between passes"


def test_keep_free_and_max_size_hot_reload(disk: Path, tmp_path: Path) -> None:
    run = disk / "run"
    run.mkdir()
    for index in range(8):
        path = run / step_name(0, 100 * (index + 1))
        path.write_bytes(zip_bytes(bytes(4 * MIB)))
        stamp = time.time() - 3600 + index
        os.utime(path, (stamp, stamp))
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: -1\n")
    with running_daemon(["watch", str(disk), "--policy", str(policy)], tmp_path / "log") as daemon:
        daemon.wait_ready()
        assert len(list(run.iterdir())) == 8
        size = allocated(run / step_name(0, 800))
        policy.write_text("save_top_k_checkpoints: -1\nkeep_free: 36MiB\n")
        daemon.wait_for("policy_reloaded")
        wait_until(lambda: free_bytes(disk) >= 36 * MIB + size, 30, "keep_free + the next save")
        assert free_bytes(disk) < 36 * MIB + 2 * size
        policy.write_text("save_top_k_checkpoints: -1\nkeep_free: 36MiB\nmax_size: 9MiB\n")
        daemon.wait_for("policy_reloaded", count=2)
        wait_until(lambda: len(list(run.iterdir())) == 2, 30, "max_size 9 MiB: two 4 MiB checkpoints")
        assert daemon.stop() == 0
    # Counted once the daemon stopped: a deletion is logged just after it is done, so a count taken
    # when the free space was seen could miss the last keep_free record.
    reasons = [record["reasons"][0] for record in daemon.events("checkpoint_deleted")]
    by_keep_free = sum("keep_free 36.0 MiB + next save 4.0 MiB" in reason for reason in reasons)
    assert by_keep_free >= 1
    assert all("keep_free 36.0 MiB + next save 4.0 MiB" in reason for reason in reasons[:by_keep_free])
    assert all("group over max_size 9.0 MiB" in reason for reason in reasons[by_keep_free:])
    assert sorted(path.name for path in run.iterdir()) == [step_name(0, 700), step_name(0, 800)]


def test_budget_unmet_is_logged_once_per_change_not_every_pass(disk: Path, tmp_path: Path) -> None:
    run = disk / "run"
    run.mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: -1\nmax_size: 0\n")
    (run / step_name(0, 100)).write_bytes(zip_bytes(bytes(MIB)))
    with running_daemon(
        ["watch", str(disk), "--policy", str(policy), "--settle", "0"], tmp_path / "log"
    ) as daemon:
        daemon.wait_ready()
        daemon.wait_for("budget_unmet")
        for step in (200, 300, 400):  # each a pass that evicts the previous newest, still unmet
            (run / step_name(0, step)).write_bytes(zip_bytes(bytes(MIB)))
            daemon.wait_for("checkpoint_deleted", count=step // 100 - 1)
        daemon.wait_for("pass_completed", lambda record: record["trigger"] == "event", count=3)
        assert len(daemon.events("budget_unmet")) == 1
        policy.write_text("save_top_k_checkpoints: -1\nmax_size: 1000\n")  # another limit, still unmet
        daemon.wait_for("budget_unmet", count=2)
        policy.write_text("save_top_k_checkpoints: -1\nmax_size: 10MiB\n")
        daemon.wait_for("budget_met")
        assert daemon.stop() == 0
    unmet = daemon.events("budget_unmet")
    assert [record["limit_bytes"] for record in unmet] == [0, 1000]
    assert all(record["budget"] == "max_size" and record["directory"] == str(run) for record in unmet)
    assert "the newest complete checkpoint" in unmet[0]["detail"]
    assert sorted(path.name for path in run.iterdir()) == [step_name(0, 400)]
