"""A last checkpoint left incomplete (truncated by a trainer killed mid-save, a link whose target is
gone) is warned about once, when it has been untouched long enough not to be a save in progress."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ckpt_watcher.naming import Kind
from ckpt_watcher.reconcile import LAST_QUIET_SECONDS, _warn_incomplete_last
from ckpt_watcher.records import CheckpointRecord, EntryType, FileIdentity

AN_HOUR = 3600.0


def _last(reason: str, *, age: float = AN_HOUR, inode: int = 7) -> CheckpointRecord:
    """An incomplete last.ckpt last modified ``age`` seconds ago (taken now, when the test runs)."""
    identity = FileIdentity(1, inode, 10, int((time.time() - age) * 1e9))
    return CheckpointRecord.at(
        Path("/ckpt/run/last.ckpt"),
        relative_path="run/last.ckpt",
        kind=Kind.LAST,
        entry_type=EntryType.FILE,
        bytes=10,
        identity=identity,
        complete=False,
        incomplete_reason=reason,
    )


@pytest.mark.parametrize(
    ("reason", "age", "warned"),
    [
        ("no end-of-central-directory record: still being written or truncated", AN_HOUR, True),
        ("dangling symlink", AN_HOUR, True),
        ("empty: still being written", AN_HOUR, True),
        ("no end-of-central-directory record: still being written or truncated", 0.0, False),
        ("symlink to a directory outside its group: not judged", AN_HOUR, False),
        ("cannot be read: Permission denied", AN_HOUR, False),
        ("still being written (latest marker present)", AN_HOUR, False),
    ],
)
def test_which_incomplete_last_checkpoints_are_warned_about(reason: str, age: float, warned: bool) -> None:
    with capture_logs() as logs:
        remembered = _warn_incomplete_last((), [_last(reason, age=age)])
    assert [log["event"] for log in logs] == (["last_checkpoint_incomplete"] if warned else [])
    assert len(remembered) == (1 if warned else 0)


def test_each_incomplete_last_checkpoint_is_warned_about_once_and_again_if_it_is_replaced() -> None:
    truncated = _last("no end-of-central-directory record: still being written or truncated")
    with capture_logs() as logs:
        remembered = _warn_incomplete_last((), [truncated])
        remembered = _warn_incomplete_last(remembered, [truncated])
        replaced = _last("dangling symlink", inode=8)
        remembered = _warn_incomplete_last(remembered, [replaced])
        remembered = _warn_incomplete_last(remembered, [])  # repaired: forgotten
        remembered = _warn_incomplete_last(remembered, [replaced])
    assert [log["reason"] for log in logs] == [
        "no end-of-central-directory record: still being written or truncated",
        "dangling symlink",
        "dangling symlink",
    ]
    assert LAST_QUIET_SECONDS == 60.0
