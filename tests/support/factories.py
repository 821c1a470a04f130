"""Builders of records and of real checkpoint-like files for tests."""

from __future__ import annotations

import io
import os
import subprocess
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

from ckpt_watcher.config_files import CONFIG_QUIET_SECONDS
from ckpt_watcher.naming import DEFAULT_NAMING, Kind, Naming
from ckpt_watcher.records import DELETING_PREFIX, CheckpointRecord, EntryType, FileIdentity, name_fields

_inode_counter = iter(range(1, 10**9))


def step_name(epoch: int, step: int, version: int = 0) -> str:
    """A default-template step checkpoint name."""
    suffix = f"-v{version}" if version else ""
    return f"epoch={epoch:02d}-step={step:06d}-train{suffix}.ckpt"


def best_name(epoch: int, step: int, loss: float, date: str = "20261128", version: int = 0) -> str:
    """A default-template best checkpoint name."""
    suffix = f"-v{version}" if version else ""
    return f"best_{date}_epoch={epoch:02d}_step={step:06d}_loss={loss:.4f}{suffix}.ckpt"


def make_record(
    name: str,
    directory: Path = Path("/ckpt/run"),
    *,
    root: Path = Path("/ckpt"),
    entry_type: EntryType = EntryType.FILE,
    complete: bool = True,
    incomplete_reason: str | None = None,
    size: int = 1000,
    link_target: Path | None = None,
    naming: Naming = DEFAULT_NAMING,
) -> CheckpointRecord:
    """A record as the scan would produce it for ``name`` in ``directory`` (no disk access)."""
    parsed = naming.classify(name)
    path = directory / name
    checkpoint_file = entry_type is EntryType.FILE and parsed.kind is not Kind.UNKNOWN
    return CheckpointRecord(
        directory=directory,
        name=name,
        relative_path=os.path.relpath(path, root),
        entry_type=entry_type,
        bytes=size if entry_type is EntryType.FILE else 0,
        identity=FileIdentity(1, next(_inode_counter), size, 0),
        complete=complete and (checkpoint_file or (parsed.kind is Kind.LAST)),
        incomplete_reason=None if complete else (incomplete_reason or "still being written"),
        link_target=link_target,
        note=parsed.note,
        **name_fields(parsed),
    )


ZIP_ENTRY_TIME = (2026, 1, 1, 0, 0, 0)
"""The time stamped on every entry ``zip_bytes`` writes: a fixed one, so that the same payload
always gives the same bytes (``writestr`` with a bare name stamps the current time, two seconds
apart at most, and a test comparing an object with a checkpoint built again failed when a
second ticked over between the two)."""


def zip_bytes(payload: bytes = b"weights", entries: int = 1) -> bytes:
    """A small complete zip archive laid out like torch.save's (an archive/data.pkl entry), the
    same bytes for the same payload."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(_entry("archive/data.pkl"), payload)
        for index in range(1, entries):
            archive.writestr(_entry(f"archive/data/{index}"), payload)
    return buffer.getvalue()


def _entry(name: str) -> zipfile.ZipInfo:
    """An entry stored uncompressed and stamped with ``ZIP_ENTRY_TIME``."""
    return zipfile.ZipInfo(name, date_time=ZIP_ENTRY_TIME)


def write_checkpoint(path: Path, payload: bytes = b"weights") -> Path:
    """Write a complete checkpoint-like zip file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zip_bytes(payload))
    return path


def write_truncated(path: Path, payload: bytes = b"weights" * 100) -> Path:
    """Write the first half of a checkpoint, as a crash or an unfinished copy leaves it."""
    data = zip_bytes(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def directory_checkpoint(
    path: Path, shards: Mapping[str, bytes] | None = None, *, complete: bool = True
) -> Path:
    """A DeepSpeed-style directory checkpoint: ``checkpoint/`` with a zip file per shard (name ->
    payload; one ``mp_rank_00_model_states.pt`` by default), then ``latest``, written last (not at all
    unless ``complete``)."""
    (path / "checkpoint").mkdir(parents=True)
    for name, payload in (shards or {"mp_rank_00_model_states.pt": b"weights"}).items():
        write_checkpoint(path / "checkpoint" / name, payload)
    if complete:
        (path / "latest").write_text("checkpoint")
    return path


def write_backdated(path: Path, text: str) -> Path:
    """Write a file dated well before CONFIG_QUIET_SECONDS ago, as a writer whose clock is behind
    (another machine) dates one it is still writing: its time never makes a config edit quiet, only
    the daemon's own clock does (config_files.QuietFiles; tests drive it with ``quiet_clock``)."""
    path.write_text(text)
    stamp = time.time_ns() - int((CONFIG_QUIET_SECONDS + 5) * 1e9)
    os.utime(path, ns=(stamp, stamp))
    return path


def backdate_tree(top: Path, seconds: float = 3600) -> Path:
    """Make everything in ``top`` (itself included) ``seconds`` old, so directory checkpoints are past
    their quiet time. ``find -execdir`` works at any depth, never follows a link and opens nothing."""
    when = f"@{time.time() - seconds:.0f}"
    subprocess.run(
        ["find", str(top), "-execdir", "touch", "-h", "-c", "-d", when, "{}", "+"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return top


def leftovers(directory: Path) -> list[str]:
    """The names of the removals' leftovers (``.ckpt-watcher-deleting-*``) in ``directory``."""
    return sorted(name for name in os.listdir(directory) if name.startswith(DELETING_PREFIX))
