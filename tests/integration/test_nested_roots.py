"""Nested roots: ``watch ROOT`` beside ``watch ROOT/run1`` (real processes, real files). The outer
watcher keeps whole the directory the inner one watches (nested.py), at its start-up pass, in an
event pass after the inner one started, and ``prune`` (dry run too) says why."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.btrfs import mounted_btrfs
from tests.support.cli import events, prune_entries, run_cli
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.factories import step_name, write_checkpoint
from tests.support.tmpfs import MIB, mounted_tmpfs

pytestmark = pytest.mark.timeout(180)

KEEP_ALL = "save_top_k_checkpoints: -1\nsave_top_k_best: 0\nsave_every_n_epochs: 0\n"
KEEP_ONE = "save_top_k_checkpoints: 1\nsave_top_k_best: 0\nsave_every_n_epochs: 0\n"
STEPS = range(100, 600, 100)


def _policy(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def _seed(run: Path, steps: range = STEPS) -> None:
    for step in steps:
        write_checkpoint(run / step_name(0, step))


def _checkpoints(run: Path) -> list[str]:
    return sorted(path.name for path in run.iterdir() if path.suffix == ".ckpt")


@contextmanager
def _watch(tmp_path: Path, directory: Path, policy: Path, name: str) -> Iterator[DaemonProcess]:
    """A ``watch`` daemon on ``directory`` (full walks only at start: what follows is event passes)."""
    arguments = ["watch", str(directory), "--policy", str(policy), "--settle", "0", "--rescan", "3600"]
    with running_daemon(arguments, tmp_path / f"{name}.log") as daemon:
        daemon.wait_ready(timeout=60)
        yield daemon
        assert daemon.stop() == 0


def test_the_outer_watcher_keeps_whole_the_directory_the_inner_one_watches(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _seed(root / "run1")
    _seed(root / "run1" / "stage2")
    _seed(root / "run2")
    keep_all, keep_one = _policy(tmp_path, "all", KEEP_ALL), _policy(tmp_path, "one", KEEP_ONE)

    with (
        _watch(tmp_path, root / "run1", keep_all, "inner") as inner,
        _watch(tmp_path, root, keep_one, "outer") as outer,
    ):
        warnings = outer.events("group_watched_elsewhere")

    assert (
        _checkpoints(root / "run1")
        == _checkpoints(root / "run1" / "stage2")
        == [step_name(0, step) for step in STEPS]
    )
    assert _checkpoints(root / "run2") == [step_name(0, 500)]  # the outer pruned its own group
    assert {(entry["directory"], entry["pid"]) for entry in warnings} == {
        (str(root / "run1"), inner.process.pid)
    }
    assert "left to that one" in warnings[0]["detail"]


def test_a_watcher_started_inside_the_root_after_the_outer_one_is_seen_by_its_next_event_pass(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    _seed(root / "run1", range(100, 200, 100))  # one checkpoint: nothing for the outer to delete yet
    keep_all, keep_one = _policy(tmp_path, "all", KEEP_ALL), _policy(tmp_path, "one", KEEP_ONE)

    with (
        _watch(tmp_path, root, keep_one, "outer") as outer,
        _watch(tmp_path, root / "run1", keep_all, "inner"),
    ):
        _seed(root / "run1", range(200, 600, 100))
        outer.wait_for("group_watched_elsewhere", timeout=60)
        every_one_seen = lambda entry: entry["trigger"] == "event" and entry["kept_overall"] == len(STEPS)  # noqa: E731
        outer.wait_for("pass_completed", every_one_seen, timeout=60)

    assert _checkpoints(root / "run1") == [step_name(0, step) for step in STEPS]
    assert not outer.events("checkpoint_deleted")


def test_prune_keeps_a_watched_directory_and_its_dry_run_says_why(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _seed(root / "run1")
    keep_all, keep_one = _policy(tmp_path, "all", KEEP_ALL), _policy(tmp_path, "one", KEEP_ONE)

    with _watch(tmp_path, root / "run1", keep_all, "inner") as inner:
        arguments = ["prune", str(root), "--policy", str(keep_one), "--settle", "0", "--json"]
        dry_run = prune_entries(run_cli(*arguments, "--dry-run"), exit_code=0)
        pruned = prune_entries(run_cli(*arguments), exit_code=0)

    for entries in (dry_run, pruned):
        assert {entry["action"] for entry in entries.values()} == {"keep"}
        reasons = " ".join(" ".join(entry["reasons"]) for entry in entries.values())
        assert f"watched by another ckpt-watcher (pid {inner.process.pid})" in reasons
    assert _checkpoints(root / "run1") == [step_name(0, step) for step in STEPS]


HOLD_A_LOCK_FILE = """
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("lock_file", ["run1/.ckpt-watcher.lock", ".run1.ckpt-watcher.lock"])
def test_a_held_lock_file_of_the_fallback_keeps_the_directory_whole(tmp_path: Path, lock_file: str) -> None:
    """Where directories cannot be locked (NFS), a watcher locks a file inside or beside its root."""
    root = tmp_path / "root"
    _seed(root / "run1")
    keep_one = _policy(tmp_path, "one", KEEP_ONE)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_LOCK_FILE, str(root / lock_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        pruned = run_cli("prune", str(root), "--policy", str(keep_one), "--settle", "0", "--json")
    finally:
        holder.communicate("")
    entries = prune_entries(pruned, exit_code=0)
    assert {entry["action"] for name, entry in entries.items() if name.endswith(".ckpt")} == {"keep"}
    assert _checkpoints(root / "run1") == [step_name(0, step) for step in STEPS]

    released = run_cli("prune", str(root), "--policy", str(keep_one), "--settle", "0", "--json")
    assert prune_entries(released, exit_code=0)  # a lock file nobody holds is no watcher
    assert _checkpoints(root / "run1") == [step_name(0, 500)]


def test_a_watcher_of_a_btrfs_subvolume_is_seen_where_stat_and_the_lock_table_differ(tmp_path: Path) -> None:
    """btrfs gives a subvolume's files a device of their own in ``stat``, the lock table the file
    system's: the inner watcher's lock is still told (a real btrfs, a real subvolume, a real daemon)."""
    with mounted_btrfs(tmp_path) as mount:
        root = mount / "ckpt"
        root.mkdir()
        subprocess.run(["btrfs", "subvolume", "create", str(root / "run1")], capture_output=True, check=True)
        _seed(root / "run1")
        _seed(root / "run2")
        keep_all, keep_one = _policy(tmp_path, "all", KEEP_ALL), _policy(tmp_path, "one", KEEP_ONE)
        assert (root / "run1").stat().st_dev != root.stat().st_dev  # the case: a subvolume's own device

        with _watch(tmp_path, root / "run1", keep_all, "inner") as inner:
            pruned = run_cli("prune", str(root), "--policy", str(keep_one), "--settle", "0", "--json")

        assert pruned.returncode == 0, pruned.stderr
        assert [record.get("pid") for record in events(pruned.stderr, "group_watched_elsewhere")] == [
            inner.process.pid
        ]
        assert _checkpoints(root / "run1") == [step_name(0, step) for step in STEPS]
        assert _checkpoints(root / "run2") == [step_name(0, 500)]


def _file_with_inode(directory: Path, inode: int) -> Path:
    """A new file in ``directory`` that has inode number ``inode`` (tmpfs numbers them in order)."""
    for index in range(256):
        path = directory / f"database-{index}"
        path.touch()
        if path.stat().st_ino == inode:
            return path
    pytest.skip(f"no file of {directory} got inode {inode}: this kernel numbers tmpfs inodes otherwise")


LOCKF = """
import fcntl, sys
file = open(sys.argv[1], "r+")
fcntl.lockf(file, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_a_lock_on_another_file_system_with_the_same_inode_number_keeps_nothing(tmp_path: Path) -> None:
    """An unrelated process (a database's POSIX lock) on a file of another file system whose inode
    number is a run directory's: not a watcher of that run, which is pruned as usual, with no warning."""
    with (
        mounted_tmpfs(tmp_path / "a", 16 * MIB) as disk_a,
        mounted_tmpfs(tmp_path / "b", 16 * MIB) as disk_b,
    ):
        root = disk_a / "root"
        _seed(root / "run1")
        database = _file_with_inode(disk_b, (root / "run1").stat().st_ino)
        keep_one = _policy(tmp_path, "one", KEEP_ONE)
        holder = subprocess.Popen(
            [sys.executable, "-c", LOCKF, str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "held\n"
            pruned = run_cli("prune", str(root), "--policy", str(keep_one), "--settle", "0", "--json")
        finally:
            holder.communicate("")

        assert pruned.returncode == 0, pruned.stderr
        assert events(pruned.stderr, "group_watched_elsewhere") == []
        assert _checkpoints(root / "run1") == [step_name(0, 500)]
