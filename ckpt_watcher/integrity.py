"""Is a checkpoint file whole? torch.save (since 1.6) writes a zip archive whose central directory comes last.

A file counts as complete only if its end-of-central-directory record ends exactly at the end of the
file and the central directory it points to parses. A file still being streamed by ``torch.save`` or
copied by ``cp`` has neither, so it never counts, and so never pushes a complete one out.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

_LOCAL_HEADER_MAGIC = b"PK\x03\x04"
_END_OF_CENTRAL_DIRECTORY_MAGIC = b"PK\x05\x06"
_END_OF_CENTRAL_DIRECTORY_SIZE = 22
_MAXIMUM_COMMENT = 0xFFFF
_NO_END_RECORD = "no end-of-central-directory record: still being written or truncated"
_END_RECORD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR_MAGIC = b"PK\x06\x07"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END_MAGIC = b"PK\x06\x06"
_ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_HEADER_MAGIC = b"PK\x01\x02"
_CENTRAL_HEADER_SIZE = 46
_CENTRAL_LENGTHS = struct.Struct("<3H")
_MAXIMUM_CENTRAL_DIRECTORY = 1 << 30


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
    """Judge the open file ``file_descriptor`` of ``size`` bytes: its head, tail and central directory."""
    if size == 0:
        return Completeness(False, "empty: still being written")
    head = os.pread(file_descriptor, 4, 0)
    if head != _LOCAL_HEADER_MAGIC:
        return Completeness(
            False, "not a zip archive (a legacy torch.save file or not a checkpoint)", not_zip=True
        )
    if size < _END_OF_CENTRAL_DIRECTORY_SIZE:
        return Completeness(False, _NO_END_RECORD)
    # torch.save writes no archive comment, so the record is almost always the last 22 bytes; read
    # the 20 before it too, where a zip64 locator would be.
    tail_length = min(size, _END_OF_CENTRAL_DIRECTORY_SIZE + _ZIP64_LOCATOR.size)
    tail = os.pread(file_descriptor, tail_length, size - tail_length)
    position = _find_end_record(tail)
    if position is None:
        tail_length = min(size, _END_OF_CENTRAL_DIRECTORY_SIZE + _MAXIMUM_COMMENT)
        tail = os.pread(file_descriptor, tail_length, size - tail_length)
        position = _find_end_record(tail)
        if position is None:
            return Completeness(False, _NO_END_RECORD)
    end_offset = size - tail_length + position
    record = tail[position : position + _END_OF_CENTRAL_DIRECTORY_SIZE]
    locator = tail[position - _ZIP64_LOCATOR.size : position] if position >= _ZIP64_LOCATOR.size else None
    problem = _check_central_directory(file_descriptor, end_offset, record, locator)
    if problem is not None:
        return Completeness(False, f"central directory does not parse: {problem}")
    return COMPLETE


def _check_central_directory(  # noqa: C901  (the zip format's checks, in the order its records come)
    file_descriptor: int, end_offset: int, record: bytes, locator: bytes | None
) -> str | None:
    """Walk every central-directory header; None if all are there and end where the end record says.

    ``locator`` is the 20 bytes before the end record, if already read.
    """
    _, _, _, _, entries, directory_size, directory_offset, _ = _END_RECORD.unpack(record)
    directory_end = end_offset
    locator_offset = end_offset - _ZIP64_LOCATOR.size
    if locator_offset >= 0:
        if locator is None:
            locator = os.pread(file_descriptor, _ZIP64_LOCATOR.size, locator_offset)
        if locator[:4] == _ZIP64_LOCATOR_MAGIC:
            _, _, zip64_offset, _ = _ZIP64_LOCATOR.unpack(locator)
            zip64_record = os.pread(file_descriptor, _ZIP64_END_RECORD.size, zip64_offset)
            if len(zip64_record) != _ZIP64_END_RECORD.size or zip64_record[:4] != _ZIP64_END_MAGIC:
                return "the zip64 end record is missing"
            fields = _ZIP64_END_RECORD.unpack(zip64_record)
            entries, directory_size, directory_offset = fields[7], fields[8], fields[9]
            directory_end = zip64_offset
    if entries == 0:
        return "the archive holds no entries"
    if directory_offset + directory_size != directory_end:
        return "it does not end where the end record says"
    if directory_size > _MAXIMUM_CENTRAL_DIRECTORY:
        return f"implausibly large ({directory_size} bytes)"
    directory = os.pread(file_descriptor, directory_size, directory_offset)
    if len(directory) != directory_size:
        return "it is cut short"
    position = 0
    count = 0
    while position < directory_size:
        if directory[position : position + 4] != _CENTRAL_HEADER_MAGIC:
            return f"no entry header at offset {directory_offset + position}"
        if position + _CENTRAL_HEADER_SIZE > directory_size:
            return "an entry header is cut short"
        name_length, extra_length, comment_length = _CENTRAL_LENGTHS.unpack_from(directory, position + 28)
        position += _CENTRAL_HEADER_SIZE + name_length + extra_length + comment_length
        count += 1
    if position != directory_size or count != entries:
        return f"{count} entries found where the end record says {entries}"
    return None


def _find_end_record(tail: bytes) -> int | None:
    """Where in ``tail`` an end-of-central-directory record (plus its comment) ends exactly at the end."""
    position = tail.rfind(_END_OF_CENTRAL_DIRECTORY_MAGIC)
    while position != -1:
        record = tail[position : position + _END_OF_CENTRAL_DIRECTORY_SIZE]
        if len(record) == _END_OF_CENTRAL_DIRECTORY_SIZE:
            comment_length = struct.unpack("<H", record[20:22])[0]
            if position + _END_OF_CENTRAL_DIRECTORY_SIZE + comment_length == len(tail):
                return position
        position = tail.rfind(_END_OF_CENTRAL_DIRECTORY_MAGIC, 0, position)
    return None


def check_zip_path(
    path: str, *, follow_symlinks: bool = False, dir_fd: int | None = None, size: int | None = None
) -> Completeness:
    """Open ``path`` read-only (not through a symlink unless asked) and judge it.

    ``size`` is what a stat the caller just made says; without it the open file is stat'ed.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        file_descriptor = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return Completeness(False, "vanished while being checked")
    except OSError as error:
        return Completeness(False, f"cannot be read: {error.strerror}")
    try:
        return check_zip_file(
            file_descriptor, size if size is not None else os.fstat(file_descriptor).st_size
        )
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
