"""One watcher per checkpoint directory: an exclusive ``flock`` on the directory itself.

Locking the directory (a read-only ``O_DIRECTORY`` descriptor) leaves no file in it, so a trainer that
checks its checkpoint directory is empty (Lightning's ModelCheckpoint) sees nothing of the watcher,
and nothing planted under any name can disable the lock. The lock lives on the checkpoint volume, so
two pods sharing a volume exclude each other where the file system shares locks between clients.

Where a directory cannot be locked (NFS emulates ``flock`` with POSIX locks, which need a file open
for writing), a lock file is locked instead: beside the root (``.NAME.ckpt-watcher.lock`` in its
parent) if the parent is on the same file system and writable, else inside the root
(``.ckpt-watcher.lock``). A lock that cannot be taken at all is an error, never a reason to run
without one. The holder's pid comes from ``/proc/locks`` (by device and inode), or from the lock file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from ckpt_watcher.aliases import lock_table_device, read_mount_table
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.records import display_name

LOCK_FILE_NAME = ".ckpt-watcher.lock"
PROC_LOCKS = Path("/proc/locks")
_PROC_LOCKS_LIMIT = 4 << 20
# "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2154916 0 EOF"; a waiter's line has "->" after the number.
_PROC_LOCKS_LINE = re.compile(
    r"^\s*\d+:\s+(?P<waiter>->\s+)?(?P<type>\S+)\s+\S+\s+(?P<access>\S+)\s+(?P<pid>-?\d+)\s+"
    r"(?P<major>[0-9a-f]+):(?P<minor>[0-9a-f]+):(?P<inode>\d+)\s"
)
# A lock file cannot be created here because the directory is read-only: try the next place.
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_REPLACED_RETRIES = 3


class LockHeldError(Exception):
    """The lock cannot be had; ``pid`` is the holder's, if known. Exit code 2 for the daemon."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        owner = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"another ckpt-watcher is already pruning {display_name(path)} ({owner})")


class LockUnusableError(LockHeldError):
    """No lock could be taken at all (the file system has no locks, a hostile file is in the way...).

    A LockHeldError, so every caller that refuses to run when the lock is held refuses here too:
    running without the lock is never the answer.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, None)
        self.reason = reason
        self.args = (f"cannot take the single-instance lock on {display_name(path)}: {display_name(reason)}",)

    def __str__(self) -> str:
        return str(self.args[0])


class DirectoryLock:
    """An exclusive, non-blocking lock held for as long as the watcher runs on ``directory``.

    ``path`` is what is locked: the directory itself, or the lock file used where it cannot be.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory
        self._file_descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock; LockHeldError if another process has it, LockUnusableError if none can be had.

        Never an OSError: a caller that logged one and ran on would run without the lock.
        """
        try:
            self._acquire()
        except LockHeldError:
            raise
        except OSError as error:
            raise LockUnusableError(self.directory, describe_os_error(error)) from None

    def _acquire(self) -> None:
        file_descriptor = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(file_descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = _holder_of(os.fstat(file_descriptor), self.directory)
            finally:
                os.close(file_descriptor)
            raise LockHeldError(self.directory, pid) from None
        except OSError:  # this file system cannot lock directories (NFS: EBADF)
            try:
                directory_status = os.fstat(file_descriptor)
            finally:
                os.close(file_descriptor)
            self._lock_a_file(directory_status)
            return
        except BaseException:
            os.close(file_descriptor)
            raise
        self._file_descriptor = file_descriptor
        self.path = self.directory

    def _lock_a_file(self, directory_status: os.stat_result) -> None:
        """The fallback where directories cannot be locked: beside the root, else inside it."""
        places = [self.directory / LOCK_FILE_NAME]
        parent = self.directory.parent
        if parent != self.directory:
            try:
                same_file_system = os.stat(parent).st_dev == directory_status.st_dev
            except OSError:
                same_file_system = False
            if same_file_system:
                places.insert(0, parent / f".{self.directory.name}{LOCK_FILE_NAME}")
        for index, place in enumerate(places):
            last = index == len(places) - 1
            if self._lock_file(place, may_skip=not last):
                try:
                    for other in places:
                        if other != place:
                            _refuse_if_held(self.directory, other)
                except BaseException:
                    self.release()
                    raise
                return
        raise LockUnusableError(
            self.directory, "no place for a lock file"
        )  # unreachable: the last may not skip

    def _lock_file(self, place: Path, *, may_skip: bool) -> bool:
        """Lock the file ``place``, created if need be; False if it cannot be created and may be skipped."""
        for _ in range(_REPLACED_RETRIES):
            try:
                file_descriptor = os.open(
                    place, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644
                )
            except OSError as error:
                if may_skip and error.errno in _NOT_WRITABLE and not os.path.lexists(place):
                    return False
                raise LockUnusableError(self.directory, f"{place}: {describe_os_error(error)}") from None
            try:
                status = os.fstat(file_descriptor)
                if not stat.S_ISREG(status.st_mode):
                    raise LockUnusableError(self.directory, f"{place}: not a regular file")
                try:
                    fcntl.flock(file_descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise LockHeldError(
                        self.directory, _read_pid(file_descriptor) or _holder_of(status, place)
                    ) from None
                except OSError as error:
                    raise LockUnusableError(
                        self.directory,
                        f"{place}: {describe_os_error(error)} (the file system supports no locks)",
                    ) from None
                if not _still_named(place, status):
                    os.close(file_descriptor)  # replaced between open and lock: what we hold excludes nobody
                    continue
                os.ftruncate(file_descriptor, 0)
                os.pwrite(file_descriptor, f"{os.getpid()}\n".encode(), 0)
            except BaseException:
                os.close(file_descriptor)
                raise
            self._file_descriptor = file_descriptor
            self.path = place
            return True
        raise LockUnusableError(self.directory, f"{place}: replaced each time it was locked")

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it); a lock file stays, harmlessly."""
        if self._file_descriptor is not None:
            os.close(self._file_descriptor)
            self._file_descriptor = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._file_descriptor is not None


def holder_in_proc_locks(text: str, device: int, inode: int, table_device: int | None = None) -> int | None:
    """The pid holding an exclusive lock on (device, inode) according to ``/proc/locks`` text.

    Waiters ("->") and shared locks are not holders; pid 0 means a holder outside this pid namespace.
    On btrfs, whose subvolumes give ``stat`` another device than the lock table's, ``table_device`` is
    the lock table's (``aliases.lock_table_device``): if no line has ``device``, the single exclusive
    lock on that inode with ``table_device`` is the holder (never one on another file system).
    """
    on_inode = [(device_of, pid) for device_of, inode_of, pid in exclusive_locks(text) if inode_of == inode]
    pid = holder_among(on_inode, device, table_device)
    return pid if pid is not None and pid > 0 else None


def holder_among(on_inode: Sequence[tuple[int, int]], device: int, table_device: int | None) -> int | None:
    """Which of the exclusive locks on one inode, as (device, pid), is the one on (``device``, that
    inode): the lock with ``device``; else, on btrfs (``table_device``: the lock table's device for
    that file system, when ``stat`` gives another), the single lock with ``table_device``; else None.
    Never a lock on another file system that merely has the same inode number."""
    exact = [pid for device_of, pid in on_inode if device_of == device]
    if exact:
        return exact[0]
    across = [pid for device_of, pid in on_inode if device_of == table_device and table_device != device]
    return across[0] if len(across) == 1 else None


def exclusive_locks(text: str) -> list[tuple[int, int, int]]:
    """The (device, inode, pid) of every exclusive lock held (not waited for) in ``/proc/locks`` text;
    pid 0 is a holder outside this pid namespace."""
    locks: list[tuple[int, int, int]] = []
    for line in text.splitlines():
        match = _PROC_LOCKS_LINE.match(line)
        if match is None or match["waiter"] or match["access"] != "WRITE":
            continue
        device = os.makedev(int(match["major"], 16), int(match["minor"], 16))
        locks.append((device, int(match["inode"]), int(match["pid"])))
    return locks


def read_proc_locks() -> str | None:
    """The text of ``/proc/locks`` (a bounded read), or None if it cannot be read."""
    try:
        with PROC_LOCKS.open("rb") as table:
            return table.read(_PROC_LOCKS_LIMIT).decode("ascii", "replace")
    except OSError:
        return None


def _holder_of(status: os.stat_result, path: Path) -> int | None:
    text = read_proc_locks()
    if text is None:
        return None
    table_device = lock_table_device(os.path.abspath(path), read_mount_table())
    return holder_in_proc_locks(text, status.st_dev, status.st_ino, table_device)


def _refuse_if_held(directory: Path, other: Path) -> None:
    """LockHeldError if the other place a lock file may be (``other``) is locked: which place a watcher
    uses depends on whether it may write the parent (its uid, a read-only mount of the parent), so two
    watchers of one root could otherwise hold two files and both run. LockUnusableError if whether it
    is held cannot be told (a file this process can only read: NFS locks need it open for writing).
    A missing file, or one no watcher could have locked (not a regular file), is nobody's lock."""
    if not os.path.lexists(other):
        return
    file_descriptor = -1
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            file_descriptor = os.open(other, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as error:
            if error.errno not in _NOT_WRITABLE:
                return  # missing (or a symlink, which no watcher locks through): nobody's lock
    if file_descriptor < 0:
        raise LockUnusableError(directory, f"{other}: cannot be opened to tell whether it is held")
    try:
        if not stat.S_ISREG(os.fstat(file_descriptor).st_mode):
            return
        try:
            fcntl.flock(file_descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeldError(directory, _read_pid(file_descriptor)) from None
        except OSError as error:
            reason = f"{other}: cannot tell whether it is held ({describe_os_error(error)})"
            raise LockUnusableError(directory, reason) from None
    finally:
        os.close(file_descriptor)  # a lock this test took goes with it


def _still_named(place: Path, status: os.stat_result) -> bool:
    try:
        current = os.stat(place, follow_symlinks=False)
    except OSError:
        return False
    return (current.st_dev, current.st_ino) == (status.st_dev, status.st_ino)


def _read_pid(file_descriptor: int) -> int | None:
    try:
        text = os.pread(file_descriptor, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
