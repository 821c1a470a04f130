"""A small, real file system for the tests of retention by bytes: a tmpfs mounted for one test.

No ``statvfs`` is mocked anywhere: free space is what the kernel says about this tmpfs. Mounting needs
root (CI runs as root); elsewhere the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MIB = 1024 * 1024


@contextmanager
def mounted_tmpfs(directory: Path, size_bytes: int) -> Iterator[Path]:
    """A fresh tmpfs of ``size_bytes`` on ``directory`` (created), always unmounted afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); CI runs these tests as root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs on {directory}: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        unmounted = subprocess.run(["umount", str(directory)], capture_output=True, check=False)
        if unmounted.returncode != 0:  # still busy (a child not yet reaped): detach it now
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    """What an unprivileged writer may still write on ``path``'s file system."""
    status = os.statvfs(path)
    return status.f_bavail * status.f_frsize


def total_bytes(path: Path) -> int:
    """The size of ``path``'s file system."""
    status = os.statvfs(path)
    return status.f_blocks * status.f_frsize
