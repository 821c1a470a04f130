"""One watcher per checkpoint directory: an exclusive ``flock`` on a lock file inside it.

The lock file lives on the checkpoint volume itself, so two pods that share the volume exclude each
other too (on file systems whose locks are shared, such as NFSv4 and local disks).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE_NAME = ".ckpt-watcher.lock"


class LockHeldError(Exception):
    """Another process holds the lock; ``pid`` is what it wrote, if readable."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        owner = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"another ckpt-watcher is already pruning {path} ({owner})")


class DirectoryLock:
    """An exclusive, non-blocking lock held for as long as the watcher runs on ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE_NAME
        self._file_descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise LockHeldError; writes this process's pid into the file."""
        file_descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(file_descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(file_descriptor)
            os.close(file_descriptor)
            raise LockHeldError(self.directory, pid) from None
        except BaseException:
            os.close(file_descriptor)
            raise
        os.ftruncate(file_descriptor, 0)
        os.pwrite(file_descriptor, f"{os.getpid()}\n".encode(), 0)
        self._file_descriptor = file_descriptor

    def release(self) -> None:
        """Drop the lock (closing the file releases it); the file stays, harmlessly."""
        if self._file_descriptor is not None:
            os.close(self._file_descriptor)
            self._file_descriptor = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._file_descriptor is not None


def _read_pid(file_descriptor: int) -> int | None:
    try:
        text = os.pread(file_descriptor, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
