"""Is a checkpoint file whole? torch.save (since 1.6) writes a zip archive whose central directory comes last.

A file counts as complete only if its end-of-central-directory record ends exactly at the end of the
file and the central directory it points to parses. A file still being streamed by ``torch.save`` or
copied by ``cp`` has neither, so it never counts, and so never pushes a complete one out.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass

_LOCAL_HEADER_MAGIC = b"PK\x03\x04"
_END_OF_CENTRAL_DIRECTORY_MAGIC = b"PK\x05\x06"
_END_OF_CENTRAL_DIRECTORY_SIZE = 22
_MAXIMUM_COMMENT = 0xFFFF
_NO_END_RECORD = "no end-of-central-directory record: still being written or truncated"


@dataclass(frozen=True, slots=True)
class Completeness:
    """The verdict on one file: complete, or why not.

    ``not_zip`` marks a name-matching non-archive; ``settles_at`` a file only waiting out the settle time.
    """

    complete: bool
    reason: str | None = None
    not_zip: bool = False
    settles_at: float | None = None
    corrupt: bool = False


COMPLETE = Completeness(complete=True)


def check_zip_file(file_descriptor: int, size: int) -> Completeness:
    """Judge the open file ``file_descriptor`` of ``size`` bytes; reads only its head and tail."""
    if size == 0:
        return Completeness(False, "empty: still being written")
    head = os.pread(file_descriptor, 4, 0)
    if head != _LOCAL_HEADER_MAGIC:
        return Completeness(
            False, "not a zip archive (a legacy torch.save file or not a checkpoint)", not_zip=True
        )
    if size < _END_OF_CENTRAL_DIRECTORY_SIZE:
        return Completeness(False, _NO_END_RECORD)
    # torch.save writes no archive comment, so the record is almost always the last 22 bytes.
    last_record = os.pread(
        file_descriptor, _END_OF_CENTRAL_DIRECTORY_SIZE, size - _END_OF_CENTRAL_DIRECTORY_SIZE
    )
    if not _ends_with_end_record(last_record):
        tail_length = min(size, _END_OF_CENTRAL_DIRECTORY_SIZE + _MAXIMUM_COMMENT)
        tail = os.pread(file_descriptor, tail_length, size - tail_length)
        if not _ends_with_end_record(tail):
            return Completeness(False, _NO_END_RECORD)
    try:
        with os.fdopen(os.dup(file_descriptor), "rb") as stream, zipfile.ZipFile(stream) as archive:
            if not archive.infolist():
                return Completeness(False, "zip archive holds no entries")
    except (zipfile.BadZipFile, ValueError, struct.error, EOFError) as error:
        return Completeness(False, f"central directory does not parse: {error}")
    return COMPLETE


def _ends_with_end_record(tail: bytes) -> bool:
    """True if an end-of-central-directory record (plus its comment) ends exactly at the file's end."""
    position = tail.rfind(_END_OF_CENTRAL_DIRECTORY_MAGIC)
    while position != -1:
        record = tail[position : position + _END_OF_CENTRAL_DIRECTORY_SIZE]
        if len(record) == _END_OF_CENTRAL_DIRECTORY_SIZE:
            comment_length = struct.unpack("<H", record[20:22])[0]
            if position + _END_OF_CENTRAL_DIRECTORY_SIZE + comment_length == len(tail):
                return True
        position = tail.rfind(_END_OF_CENTRAL_DIRECTORY_MAGIC, 0, position)
    return False


def check_zip_path(path: str, *, follow_symlinks: bool = False, dir_fd: int | None = None) -> Completeness:
    """Open ``path`` read-only (not through a symlink unless asked) and judge it."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        file_descriptor = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return Completeness(False, "vanished while being checked")
    except OSError as error:
        return Completeness(False, f"cannot be read: {error.strerror}")
    try:
        return check_zip_file(file_descriptor, os.fstat(file_descriptor).st_size)
    except OSError as error:
        return Completeness(False, f"cannot be read: {error.strerror}")
    finally:
        os.close(file_descriptor)


# A directory checkpoint is whole once the file its writer writes last exists (see docs/ or README):
#   DeepSpeed (Lightning's DeepSpeedStrategy): rank 0 writes `latest` after its model/optimizer files;
#   Lightning FSDP sharded: torch.distributed.checkpoint's `.metadata`, then `meta.pt`;
#   torch.distributed.checkpoint: `.metadata` (written to .metadata.tmp, then renamed);
#   Hugging Face Trainer `checkpoint-N/`: `trainer_state.json`.
# Other ranks may still be writing when the marker appears (DeepSpeed), so the whole tree must also
# have been quiet for a while.
DIRECTORY_QUIET_SECONDS = 30.0
_DEEPSPEED_MARKER = "latest"
_DCP_MARKER = ".metadata"
_LIGHTNING_FSDP_MARKER = "meta.pt"
_HUGGING_FACE_MARKER = "trainer_state.json"
_NO_MARKER = (
    "no completion marker yet (DeepSpeed 'latest', Lightning FSDP 'meta.pt', "
    "torch.distributed.checkpoint '.metadata', Hugging Face 'trainer_state.json')"
)


@dataclass(frozen=True, slots=True)
class DirectoryVerdict:
    """A directory checkpoint: is it whole, what layout, how many bytes its files hold."""

    completeness: Completeness
    layout: str | None
    bytes: int


def _directory_layout(entries: set[str], name: str) -> tuple[str | None, str | None]:
    """(layout, missing-marker reason or None when complete)."""
    if _DEEPSPEED_MARKER in entries:
        return "DeepSpeed", None
    if _DCP_MARKER in entries or _LIGHTNING_FSDP_MARKER in entries:
        lightning = name.endswith(".ckpt") or _LIGHTNING_FSDP_MARKER in entries
        if lightning:
            if _LIGHTNING_FSDP_MARKER in entries and _DCP_MARKER in entries:
                return "Lightning FSDP (sharded)", None
            return "Lightning FSDP (sharded)", "still being written (meta.pt, written last, is missing)"
        return "torch.distributed.checkpoint", None
    if _HUGGING_FACE_MARKER in entries:
        return "Hugging Face Trainer", None
    return None, _NO_MARKER


def check_directory(path: str, name: str, *, quiet_seconds: float, now: float) -> DirectoryVerdict:
    """Judge a directory checkpoint: its marker, and no file in it modified for ``quiet_seconds``."""
    total = 0
    newest = 0.0
    pending = [path]
    top_entries: set[str] = set()
    try:
        while pending:
            current = pending.pop()
            with os.scandir(current) as iterator:
                for entry in iterator:
                    if current == path:
                        top_entries.add(entry.name)
                    status = entry.stat(follow_symlinks=False)
                    newest = max(newest, status.st_mtime)
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += status.st_size
            newest = max(newest, os.stat(current, follow_symlinks=False).st_mtime)
    except FileNotFoundError:
        return DirectoryVerdict(Completeness(False, "vanished while being checked"), None, total)
    except OSError as error:
        return DirectoryVerdict(Completeness(False, f"cannot be read: {error.strerror}"), None, total)
    layout, missing = _directory_layout(top_entries, name)
    if missing is not None:
        return DirectoryVerdict(Completeness(False, missing), layout, total)
    age = now - newest
    if age < quiet_seconds:
        reason = (
            f"still being written (a file in it changed {max(age, 0.0):.1f} s ago, "
            f"quiet time {quiet_seconds:g} s)"
        )
        return DirectoryVerdict(Completeness(False, reason, settles_at=newest + quiet_seconds), layout, total)
    return DirectoryVerdict(COMPLETE, layout, total)
