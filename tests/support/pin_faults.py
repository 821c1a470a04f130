"""Pins of restored checkpoints that cannot be read, for as long as a test says: a real EIO on one file
cannot be staged (root reads through any mode, and a tmpfs never fails a read)."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from ckpt_watcher import trash as trash_module


class PinReads:
    """While ``failing``, every read of a metadata file in a trash's ``restored/`` raises EIO."""

    def __init__(self) -> None:
        self.failing = False


def failing_pin_reads(monkeypatch: pytest.MonkeyPatch) -> PinReads:
    """Make reads of pins fail with EIO while the returned switch's ``failing`` is True (False first)."""
    switch = PinReads()
    read_metadata = trash_module.read_metadata

    def read(dir_fd: int, name: str) -> Any:
        if switch.failing and os.readlink(f"/proc/self/fd/{dir_fd}").endswith("/restored"):
            raise OSError(errno.EIO, "Input/output error")
        return read_metadata(dir_fd, name)

    monkeypatch.setattr(trash_module, "read_metadata", read)
    return switch
