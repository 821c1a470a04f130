"""The single-instance lock in one process: the directory itself is locked, and the holder is named."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from ckpt_watcher.lock import DirectoryLock, LockHeldError, LockUnusableError, holder_in_proc_locks


def test_the_directory_itself_is_locked_and_nothing_is_written(tmp_path: Path) -> None:
    first = DirectoryLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(LockHeldError) as refused:
            DirectoryLock(tmp_path).acquire()
        assert first.held
        assert first.path == tmp_path
        assert refused.value.pid == os.getpid()
        assert str(refused.value) == f"another ckpt-watcher is already pruning {tmp_path} (pid {os.getpid()})"
        assert os.listdir(tmp_path) == []
    finally:
        first.release()
    assert not first.held
    again = DirectoryLock(tmp_path)
    again.acquire()
    again.release()


def test_a_missing_directory_is_an_unusable_lock(tmp_path: Path) -> None:
    with pytest.raises(LockUnusableError) as refused:
        DirectoryLock(tmp_path / "gone").acquire()

    assert isinstance(
        refused.value, LockHeldError
    )  # callers that refuse to run on a held lock refuse here too
    assert str(refused.value).startswith(f"cannot take the single-instance lock on {tmp_path / 'gone'}: ")


_LOCKS = """\
1: FLOCK  ADVISORY  WRITE 4242 fe:00:2154916 0 EOF
1: -> FLOCK  ADVISORY  WRITE 5151 fe:00:2154916 0 EOF
2: POSIX  ADVISORY  WRITE 777 fe:00:999 0 EOF
3: FLOCK  ADVISORY  READ 888 fe:00:1234 0 EOF
4: OFDLCK ADVISORY  WRITE -1 00:2f:77 0 EOF
5: FLOCK  ADVISORY  WRITE 0 08:11:31337 0 EOF
6: FLOCK  ADVISORY  WRITE 6161 00:3a:55 0 EOF
"""


BTRFS = os.makedev(0x00, 0x3A)  # the lock table's device of a btrfs whose subvolume stat gives 0:3b


@pytest.mark.parametrize(
    ("device", "inode", "table_device", "holder"),
    [
        (os.makedev(0xFE, 0x00), 2154916, None, 4242),  # the holder, not the waiter behind it
        (os.makedev(0xFE, 0x00), 999, None, 777),  # a POSIX lock (NFS's emulated flock) names its holder too
        (os.makedev(0xFE, 0x00), 1234, None, None),  # a shared lock is nobody's exclusive lock
        (os.makedev(0x08, 0x11), 31337, None, None),  # pid 0: a holder in another pid namespace
        (os.makedev(0x00, 0x3B), 55, BTRFS, 6161),  # a btrfs subvolume: its file system's lock
        (os.makedev(0x00, 0x3B), 55, None, None),  # not btrfs: another file system's inode 55
        (os.makedev(0x00, 0x3B), 55, os.makedev(0x00, 0x3C), None),  # another btrfs's inode 55
        (os.makedev(0xFE, 0x00), 1, None, None),
    ],
)
def test_holder_in_proc_locks(device: int, inode: int, table_device: int | None, holder: int | None) -> None:
    assert holder_in_proc_locks(_LOCKS, device, inode, table_device) == holder


def _refuse_directory_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    real_flock = fcntl.flock

    def flock(file: Any, operation: int) -> None:
        descriptor = file if isinstance(file, int) else file.fileno()
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real_flock(file, operation)

    monkeypatch.setattr(fcntl, "flock", flock)


def test_without_directory_locks_a_file_beside_the_root_is_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_directory_locks(monkeypatch)
    root = tmp_path / "run"
    root.mkdir()
    first = DirectoryLock(root)
    first.acquire()
    try:
        with pytest.raises(LockHeldError) as refused:
            DirectoryLock(root).acquire()
        assert first.path == tmp_path / ".run.ckpt-watcher.lock"
        assert first.path.read_text() == f"{os.getpid()}\n"
        assert refused.value.pid == os.getpid()
        assert os.listdir(root) == []
    finally:
        first.release()


def test_without_directory_locks_and_a_read_only_parent_the_file_is_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_directory_locks(monkeypatch)
    root = tmp_path / "run"
    root.mkdir()
    beside = str(tmp_path / ".run.ckpt-watcher.lock")
    real_open = os.open

    def open_(path: Any, flags: int, *arguments: Any, **options: Any) -> int:
        if os.fspath(path) == beside:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), beside)  # as for a read-only parent
        return real_open(path, flags, *arguments, **options)

    monkeypatch.setattr(os, "open", open_)
    first = DirectoryLock(root)
    first.acquire()
    try:
        with pytest.raises(LockHeldError) as refused:
            DirectoryLock(root).acquire()
        assert first.path == root / ".ckpt-watcher.lock"
        assert refused.value.pid == os.getpid()
    finally:
        first.release()


def test_without_any_lock_support_the_lock_is_unusable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def flock(file: Any, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)
    root = tmp_path / "run"
    root.mkdir()

    with pytest.raises(LockUnusableError) as refused:
        DirectoryLock(root).acquire()

    assert str(refused.value) == (
        f"cannot take the single-instance lock on {root}: {tmp_path / '.run.ckpt-watcher.lock'}: "
        "No locks available (the file system supports no locks)"
    )


def test_without_directory_locks_a_watcher_that_may_write_the_parent_still_sees_one_locked_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first watcher could not write the parent (another uid, a read-only mount of it) and locked
    the file inside the root; a second that can write the parent must not lock the file beside it
    and run too."""
    _refuse_directory_locks(monkeypatch)
    root = tmp_path / "run"
    root.mkdir()
    beside = str(tmp_path / ".run.ckpt-watcher.lock")
    real_open = os.open

    def open_(path: Any, flags: int, *arguments: Any, **options: Any) -> int:
        if os.fspath(path) == beside:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), beside)  # the parent is not its to write
        return real_open(path, flags, *arguments, **options)

    monkeypatch.setattr(os, "open", open_)
    first = DirectoryLock(root)
    first.acquire()
    monkeypatch.setattr(os, "open", real_open)  # the second watcher may write the parent
    try:
        assert first.path == root / ".ckpt-watcher.lock"
        second = DirectoryLock(root)
        with pytest.raises(LockHeldError) as refused:
            second.acquire()
        assert refused.value.pid == os.getpid()
        assert not second.held
    finally:
        first.release()
    after = DirectoryLock(root)  # once the first is gone, the lock is to be had again
    after.acquire()
    assert after.path == tmp_path / ".run.ckpt-watcher.lock"
    after.release()
