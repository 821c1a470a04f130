"""A small, real btrfs for a test: a loop device image, mounted for one test and always unmounted.

Skipped without root or ``mkfs.btrfs`` (btrfs-progs; CI installs it). Extra mount options are given
by the test (``commit=300`` keeps a commit from happening while a test reads the free space)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.tmpfs import MIB


@contextmanager
def mounted_btrfs(work: Path, *, options: str = "", size_bytes: int = 300 * MIB) -> Iterator[Path]:
    """A fresh btrfs (an image in ``work``) mounted on ``work / "btrfs"``."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop btrfs needs root (CAP_SYS_ADMIN)")
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("mkfs.btrfs is not installed (btrfs-progs)")
    image, mount = work / "btrfs.img", work / "btrfs"
    with image.open("wb") as file:
        file.truncate(size_bytes)
    made = subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"mkfs.btrfs failed: {made.stderr.strip()}")
    mount.mkdir()
    command = ["mount", "-o", ",".join(filter(None, ["loop", options])), str(image), str(mount)]
    mounted = subprocess.run(command, capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop btrfs: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
