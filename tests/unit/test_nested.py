"""nested.py: which locks of ``/proc/locks`` are another watcher's (a table of texts), and what
NestedGuard keeps whole and warns about, pass by pass, while another process holds a directory's
lock (a real ``flock`` held by a child process; the daemons are in test_nested_roots.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import LogCapture

from ckpt_watcher import nested
from ckpt_watcher.aliases import Mount, lock_table_device
from ckpt_watcher.bucket_listing import Listing
from ckpt_watcher.bucket_nested import LeaseGuard
from ckpt_watcher.lease import judge_lease
from ckpt_watcher.locations import StorageURL
from ckpt_watcher.lock import holder_in_proc_locks
from ckpt_watcher.nested import NestedGuard, OtherLocks, lock_files_of
from ckpt_watcher.object_store import Fetched, ObjectInfo, ObjectStore, StoreError
from tests.support.logs import logged

pytestmark = pytest.mark.timeout(60)

DEVICE = os.makedev(0xFE, 0)
OTHER_DEVICE = os.makedev(0, 0x2A)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1: FLOCK  ADVISORY  WRITE 4242 fe:00:77 0 EOF\n", 4242),
        ("1: POSIX  ADVISORY  WRITE 4242 fe:00:77 0 EOF\n", 4242),  # NFS emulates flock with POSIX locks
        ("1: FLOCK  ADVISORY  WRITE 0 fe:00:77 0 EOF\n", 0),  # held from another pid namespace
        ("1: FLOCK  ADVISORY  WRITE 100 fe:00:77 0 EOF\n", None),  # this process's own lock
        ("1: FLOCK  ADVISORY  READ 4242 fe:00:77 0 EOF\n", None),  # a shared lock is no watcher's
        ("1: FLOCK  ADVISORY  WRITE 4242 fe:00:78 0 EOF\n", None),  # another inode
        ("1: FLOCK  ADVISORY  WRITE 7 fe:00:77 0 EOF\n1: -> FLOCK  ADVISORY  WRITE 4242 fe:00:77 0 EOF\n", 7),
        ("1: FLOCK  ADVISORY  WRITE 4242 00:2a:77 0 EOF\n", None),  # another file system's lock (no path)
        ("garbage\n\n", None),
    ],
)
def test_the_holder_of_a_directory_is_another_process_holding_an_exclusive_lock_on_it(
    text: str, expected: int | None
) -> None:
    assert OtherLocks.parse(text, own_pid=100).holder(DEVICE, 77) == expected


# /ckw-data is btrfs (the lock table names its locks 0:2a, a subvolume's stat another device), /ckw-scratch a
# tmpfs (0:2b): only a lock on /data's file system may stand for a directory of /ckw-data with another device.
MOUNTS = [
    Mount(1, "254:0", "/", "/", "ext4"),
    Mount(2, "0:42", "/", "/ckw-data", "btrfs"),
    Mount(3, "0:43", "/", "/ckw-scratch", "tmpfs"),
]


ON_BTRFS = "1: FLOCK  ADVISORY  WRITE 4242 00:2a:77 0 EOF\n"
ON_TMPFS = "1: FLOCK  ADVISORY  WRITE 4242 00:2b:77 0 EOF\n"
TWO_ON_BTRFS = "1: FLOCK  ADVISORY  WRITE 1 00:2a:77 0 EOF\n2: FLOCK  ADVISORY  WRITE 2 00:2a:77 0 EOF\n"
ONE_EACH = "1: FLOCK  ADVISORY  WRITE 1 00:2a:77 0 EOF\n2: FLOCK  ADVISORY  WRITE 2 00:2b:77 0 EOF\n"


@pytest.mark.parametrize(
    ("text", "path", "expected"),
    [
        (ON_BTRFS, "/ckw-data/ck/run1", 4242),  # a btrfs subvolume: its file system's lock
        (ON_BTRFS, "/ckw-scratch/run1", None),  # the same inode number, not on that file system
        (ON_TMPFS, "/ckw-data/ck/run1", None),  # a tmpfs's file with the same inode number
        (ON_TMPFS, "/ckw-scratch/run1", None),  # tmpfs: stat's device is the lock table's
        (TWO_ON_BTRFS, "/ckw-data/r", None),  # two subvolumes' inode 77: which one cannot be told
        (ONE_EACH, "/ckw-data/r", 1),
        ("1: FLOCK  ADVISORY  WRITE 4242 fe:00:77 0 EOF\n", "/ckw-scratch/run1", 4242),  # its own device
    ],
)
def test_a_lock_with_another_device_stands_for_a_directory_only_on_btrfs(
    text: str, path: str, expected: int | None
) -> None:
    """btrfs subvolumes give ``stat`` a device of their own, the lock table the file system's: a lock
    on an inode of another file system (same number, another device) is never taken for one there."""
    locks = OtherLocks.parse(text, own_pid=100, mounts=MOUNTS)
    assert locks.holder(DEVICE, 77, path) == expected


def test_the_mount_table_is_kept_only_when_a_lock_is_on_btrfs() -> None:
    assert OtherLocks.parse("1: FLOCK  ADVISORY  WRITE 4 00:2b:77 0 EOF\n", 100, MOUNTS).mounts == ()
    assert OtherLocks.parse("1: FLOCK  ADVISORY  WRITE 4 00:2a:77 0 EOF\n", 100, MOUNTS).mounts == tuple(
        MOUNTS
    )


def test_the_lock_files_of_the_fallback_are_beside_the_directory_and_inside_it() -> None:
    assert lock_files_of("/r/run1") == ["/r/.run1.ckpt-watcher.lock", "/r/run1/.ckpt-watcher.lock"]


HOLD = """
import fcntl, os, sys
descriptor = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@contextmanager
def _held(directory: Path) -> Iterator[int]:
    """Another process holds an exclusive ``flock`` on ``directory`` (as a watcher of it does)."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "held\n"
        yield child.pid
    finally:
        child.communicate("")


def _walk(guard: NestedGuard, root: Path, directories: list[Path]) -> None:
    guard.begin_pass()
    walked = {(os.lstat(path).st_dev, os.lstat(path).st_ino): os.fspath(path) for path in directories}
    guard.after_walk(root, walked)


def test_a_directory_another_process_locks_is_kept_whole_with_what_is_below_it(
    tmp_path: Path, captured: LogCapture
) -> None:
    root = tmp_path / "root"
    (root / "run1" / "stage2").mkdir(parents=True)
    (root / "run2").mkdir()
    directories = [root, root / "run1", root / "run1" / "stage2", root / "run2"]
    guard = NestedGuard()

    with _held(root / "run1") as pid, _held(root):  # (a lock on the root itself is the root's own)
        for _ in range(2):
            _walk(guard, root, directories)
            kept = {path.name: guard.kept_whole(root, path) for path in directories}

            reason = f"kept whole: run1 is watched by another ckpt-watcher (pid {pid}), left to that one"
            assert kept == {
                "root": {},
                "run1": {root / "run1": reason},
                "stage2": {root / "run1" / "stage2": reason},
                "run2": {},
            }
    warnings = logged(captured, "group_watched_elsewhere")
    assert [(entry["directory"], entry["pid"]) for entry in warnings] == [(str(root / "run1"), pid)] * 2


def test_an_event_pass_reads_the_locks_again(tmp_path: Path, captured: LogCapture) -> None:
    """A watcher started (or stopped) on a run directory since the full walk is seen by the next pass."""
    root = tmp_path / "root"
    (root / "run1").mkdir(parents=True)
    guard = NestedGuard()
    _walk(guard, root, [root, root / "run1"])
    assert guard.kept_whole(root, root / "run1") == {}

    with _held(root / "run1"):
        guard.begin_pass()
        assert guard.kept_whole(root, root / "run1" / "new") != {}  # (a group below, new since the walk)
        assert guard.kept_whole(root, root / "run1") != {}
    assert len(logged(captured, "group_watched_elsewhere")) == 1

    guard.begin_pass()
    assert guard.kept_whole(root, root / "run1") == {}


LEASE = b'{"host": "gpu-7", "pid": 4242, "token": "t", "ttl_seconds": 20}'


@pytest.mark.parametrize(
    ("data", "now", "pid", "expires_in"),
    [
        (LEASE, 1005.0, 4242, 15.0),  # renewed 5 s ago (by the store's clock)
        (LEASE, 1020.0, 4242, 0.0),  # expired: its watcher crashed
        (LEASE, 1100.0, 4242, -80.0),
        (b"not a lease", 1005.0, None, 55.0),  # another's, unreadable: the default time to live
    ],
)
def test_a_sub_prefix_lease_is_judged_by_the_store_clock_as_lease_py_does(
    data: bytes, now: float, pid: int | None, expires_in: float
) -> None:
    holder, left = judge_lease(data, 1000.0, now)

    assert (holder.pid if holder is not None else None, left) == (pid, expires_in)


class _FailingStore:
    """A store whose every read fails (the lease object is listed, but cannot be read)."""

    def fetch(self, key: str, *, limit: int) -> Fetched:
        raise StoreError(f"{key}: connection reset")


def test_a_sub_prefix_lease_that_cannot_be_read_keeps_its_prefix_whole(captured: LogCapture) -> None:
    url = StorageURL("s3", "b", "run")
    lease = ObjectInfo("run/stage1/.ckpt-watcher.lease", 10, "tag", 0)
    listing = Listing.of(url, [lease, ObjectInfo("run/stage1/a.ckpt", 10, "a", 0)])
    guard = LeaseGuard(url, cast(ObjectStore, _FailingStore()))
    guard.begin_pass()

    kept = guard.kept_whole(listing, url.core_path, url.core_path / "stage1")

    assert kept == {url.core_path / "stage1": "kept whole: stage1 has another watcher's lease, unreadable"}
    assert guard.kept_whole(listing, url.core_path, url.core_path) == {}
    [warning] = logged(captured, "group_watched_elsewhere")
    assert "could not be read" in warning["detail"]


@pytest.fixture
def lock_reads(monkeypatch: pytest.MonkeyPatch) -> list[OtherLocks]:
    """Each read of ``/proc/locks`` NestedGuard makes (what it got), in order."""
    reads: list[OtherLocks] = []
    real_read = nested.read_other_locks

    def counted() -> OtherLocks:
        reads.append(real_read())
        return reads[-1]

    monkeypatch.setattr(nested, "read_other_locks", counted)
    return reads


def test_the_root_s_own_group_reads_no_locks(tmp_path: Path, lock_reads: list[OtherLocks]) -> None:
    """Listing /proc/locks write-locks the kernel's lock table for an RCU grace period (~10 ms, every
    process's flock waits): a walk that found no directory below the root, and the root's own group,
    cannot be another watcher's, so neither reads it (a full pass, then an event pass)."""
    root = tmp_path / "root"
    root.mkdir()
    guard = NestedGuard()

    with _held(root):  # (a lock on the root itself is the root's own)
        _walk(guard, root, [root])
        assert guard.kept_whole(root, root) == {}
        guard.begin_pass()
        assert guard.kept_whole(root, root) == {}

    assert lock_reads == []


@pytest.mark.parametrize(
    ("walked", "asked", "reads"),
    [
        pytest.param(["run1"], ["", "run1", "run1"], 1, id="full pass: once, after the walk"),
        pytest.param([], ["run1", "run1/new"], 1, id="event pass: once, at the first group below the root"),
        pytest.param([], ["", "", "run1"], 1, id="event pass: not for the root's group, then once"),
    ],
)
def test_a_directory_below_the_root_reads_the_locks_once_a_pass(
    tmp_path: Path, lock_reads: list[OtherLocks], walked: list[str], asked: list[str], reads: int
) -> None:
    root = tmp_path / "root"
    (root / "run1" / "new").mkdir(parents=True)
    guard = NestedGuard()

    with _held(root / "run1") as pid:
        if walked:
            _walk(guard, root, [root, *(root / name for name in walked)])
        else:
            guard.begin_pass()
        kept = [guard.kept_whole(root, root / name if name else root) for name in asked]

    assert len(lock_reads) == reads
    assert [bool(pins) for pins in kept] == [name != "" for name in asked]  # run1 and below: another's
    assert all(f"pid {pid}" in reason for pins in kept for reason in pins.values())


_LOCK_DEVICES = ("fe:00", "00:2a", "00:2b")  # this test's DEVICE; the btrfs and tmpfs of MOUNTS


@given(
    st.lists(
        st.tuples(st.sampled_from(_LOCK_DEVICES), st.sampled_from([77, 78]), st.sampled_from([0, 7, 9, 100])),
        max_size=4,
    ),
    st.sampled_from([DEVICE, OTHER_DEVICE]),
    st.sampled_from(["/ckw-data/ck/run1", "/ckw-scratch/run1", "/elsewhere/run1", None]),
)
def test_the_daemon_s_holder_is_the_lock_file_check_s_on_every_table(
    locks: list[tuple[str, int, int]], device: int, path: str | None
) -> None:
    """OtherLocks.holder (the daemon, the table parsed once a pass) and lock.holder_in_proc_locks (a
    lock refused at start) answer the same but for this process's own locks (pid 100, not another's)
    and a holder outside this pid namespace (pid 0: "unknown" to one, None to the other)."""
    line = "{number}: FLOCK  ADVISORY  WRITE {pid} {device}:{inode} 0 EOF\n"
    text = "".join(line.format(number=n, pid=p, device=d, inode=i) for n, (d, i, p) in enumerate(locks, 1))
    others = "".join(
        line.format(number=n, pid=p, device=d, inode=i) for n, (d, i, p) in enumerate(locks, 1) if p != 100
    )
    table_device = lock_table_device(path, MOUNTS) if path is not None else None

    got = OtherLocks.parse(text, own_pid=100, mounts=MOUNTS).holder(device, 77, path)

    assert (got or None) == holder_in_proc_locks(others, device, 77, table_device)


@contextmanager
def _process(*argv_tail: str) -> Iterator[int]:
    """A process whose command line ends with ``argv_tail``, running while the block runs."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv_tail])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize(
    ("holder", "inode", "expected"),
    [
        ("a ckpt-watcher", 77, True),  # on btrfs, through the file system's lock: a subvolume's directory
        ("another tool", 77, False),  # flock /srv cron.sh: not a watcher
        ("gone", 77, False),  # the pid left its lock to a child and exited
        ("a ckpt-watcher", 256, False),  # every subvolume's root: no guess across subvolumes
    ],
)
def test_a_lock_above_a_prune_counts_only_if_a_ckpt_watcher_holds_it(
    holder: str, inode: int, expected: bool
) -> None:
    """``watcher_of(strict=True)``, for the directories above a prune's PATH (cli.py): reviews found
    any tool's lock there refused the prune, and btrfs subvolume roots (all inode 256) matched each
    other."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with _process("ckpt-watcher", "watch") as watcher, _process("cron.sh") as other:
        pid = {"a ckpt-watcher": watcher, "another tool": other, "gone": gone.pid}[holder]
        text = f"1: FLOCK  ADVISORY  WRITE {pid} 00:2a:{inode} 0 EOF\n"
        locks = OtherLocks.parse(text, own_pid=100, mounts=MOUNTS)
        found = nested.watcher_of("/ckw-data/ck", (DEVICE, inode), locks, strict=True)

    assert (found == pid) is expected
