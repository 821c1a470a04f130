"""Is a checkpoint file whole? torch.save (since 1.6) writes a zip archive whose central directory comes last.

A file counts as complete only if it has no hole before its end, its end-of-central-directory record
ends exactly at the end of the file and the central directory it points to parses. A file still being
streamed by ``torch.save`` or copied by ``cp`` has neither, so it never counts, and so never pushes a
complete one out; a file pre-sized and filled in parallel ranges (a downloader) has holes until it is
done. ``verify: crc`` also reads every member once and checks its CRC-32.

Every read is bounded: by what the archive can legitimately hold (the central directory lies between
its stated offset and the end record) and by fixed chunk sizes, whatever the file claims. Only
regular files are ever opened (see filesystem.open_regular).

The archive rules read through a ``ByteSource`` (``read(offset, length)``), so a file on disk (read
with ``pread``) and an object in a bucket (read with ranged GETs of its tail, bucket.py) are judged by
the same code. Holes are a property of files on disk only: ``check_zip_file`` asks for them first.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from ckpt_watcher import clocks
from ckpt_watcher.filesystem import (
    DIRECTORY_FLAGS,
    NotRegularFileError,
    TreeSummary,
    open_regular,
    reopen_regular,
    summarize_tree,
)
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.records import FileIdentity

_LOCAL_HEADER_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_END_OF_CENTRAL_DIRECTORY_MAGIC = b"PK\x05\x06"
_END_OF_CENTRAL_DIRECTORY_SIZE = 22
_MAXIMUM_COMMENT = 0xFFFF
_NO_END_RECORD = "no end-of-central-directory record: still being written or truncated"
_END_RECORD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR_MAGIC = b"PK\x06\x07"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END_MAGIC = b"PK\x06\x06"
_ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EXTRA_ID = 0x0001
_CENTRAL_HEADER_MAGIC = b"PK\x01\x02"
_CENTRAL_HEADER = struct.Struct("<4s6H3L5H2L")
_CENTRAL_HEADER_SIZE = 46
_MAXIMUM_CENTRAL_DIRECTORY = 1 << 28  # 256 MiB: ~2 million entries; torch writes one per tensor storage
_DIRECTORY_CHUNK = 1 << 16
_DATA_CHUNK = 1 << 20
_STORED = 0
_DEFLATED = 8
_ENCRYPTED_FLAG = 0x1
_DEFLATE_MAXIMUM_RATIO = 1032  # deflate cannot inflate more than ~1032:1


@dataclass(frozen=True, slots=True)
class Completeness:
    """The verdict on one file: complete, or why not.

    ``not_zip`` marks a name-matching non-archive; ``settles_at`` a file only waiting out the settle
    time; ``mount_point`` a directory checkpoint that holds another mount (never deleted);
    ``suspicious`` a directory checkpoint, quiet for its quiet time, that its own files say is not
    whole, or a checkpoint dated far ahead of this clock (warned about: it may stay so for good, or
    long, and hold its run's retention). ``transient``
    marks a verdict that may change while the file does not (an I/O error, a settle time, a marker
    beside it): such a verdict is never cached.
    """

    complete: bool
    reason: str | None = None
    not_zip: bool = False
    settles_at: float | None = None
    corrupt: bool = False
    transient: bool = False
    mount_point: str | None = None
    suspicious: bool = False


COMPLETE = Completeness(complete=True)


class _NotWholeError(Exception):
    """Why an archive is not whole (raised while streaming its records)."""


class ByteSource(Protocol):
    """Where an archive's bytes are read from: ``read(offset, length)`` returns at most ``length``
    bytes (fewer only at the end)."""

    def read(self, offset: int, length: int) -> bytes: ...


class DescriptorSource:
    """An open file, read with ``pread`` (no file position is shared or moved)."""

    __slots__ = ("file_descriptor",)

    def __init__(self, file_descriptor: int) -> None:
        self.file_descriptor = file_descriptor

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the file)."""
        return os.pread(self.file_descriptor, length, offset)


def check_zip_file(file_descriptor: int, size: int, *, verify: str = "zip") -> Completeness:
    """Judge the open file ``file_descriptor`` of ``size`` bytes: holes, head, tail, central directory.

    ``verify="crc"`` also streams every member and checks its CRC-32; holes are then allowed (a hole
    reads as zeros, so where the data really is zeros the CRCs still match).
    """
    if size == 0:
        return Completeness(False, "empty: still being written")
    if verify != "crc":
        hole = first_hole(file_descriptor, size)
        if hole is not None:
            return Completeness(
                False, f"sparse: a hole at byte {hole} of {size} (still being downloaded or pre-allocated)"
            )
        start = max(0, size - _TAIL_WINDOW)
        window = os.pread(file_descriptor, size - start, start)
        if _whole_in_window(file_descriptor, window, start, size):
            return COMPLETE
    return check_zip_archive(TailWindowSource(DescriptorSource(file_descriptor), size), size, verify=verify)


def _whole_in_window(file_descriptor: int, window: bytes, start: int, size: int) -> bool:
    """True only if ``check_zip_archive`` (``verify: zip``) would find this archive whole, judged on
    the bytes of ``window`` (the file's bytes from ``start`` to ``size``, read once): the usual
    checkpoint, whose end record ends the file without a comment and whose central directory lies
    in the window without zip64 fields. Anything else (also any flaw) is False, and the caller
    judges the file the general way, which also says why; this only spares a whole archive the
    general way's objects (one ``unpack_from`` per entry instead of a reader and a member each)."""
    if len(window) != size - start or size < _END_OF_CENTRAL_DIRECTORY_SIZE:
        return False
    head = window[:4] if start == 0 else os.pread(file_descriptor, 4, 0)
    end_offset = size - _END_OF_CENTRAL_DIRECTORY_SIZE
    end = end_offset - start
    if head != _LOCAL_HEADER_MAGIC or window[end : end + 4] != _END_OF_CENTRAL_DIRECTORY_MAGIC:
        return False
    _, _, _, _, entries, directory_size, directory_offset, comment_length = _END_RECORD.unpack_from(
        window, end
    )
    locator = end - _ZIP64_LOCATOR.size
    if comment_length or (
        end_offset >= _ZIP64_LOCATOR.size and window[locator : locator + 4] == _ZIP64_LOCATOR_MAGIC
    ):
        return False  # the end record is not the last 22 bytes' (a comment), or a zip64 archive
    if (
        entries == 0
        or directory_offset + directory_size != end_offset
        or directory_size > _MAXIMUM_CENTRAL_DIRECTORY
        or entries > directory_size // _CENTRAL_HEADER_SIZE
        or directory_offset < start
    ):
        return False
    position = directory_offset - start
    count = 0
    unpack_header = _CENTRAL_HEADER.unpack_from
    while position < end:
        if position + _CENTRAL_HEADER_SIZE > end or window[position : position + 4] != _CENTRAL_HEADER_MAGIC:
            return False
        fields = unpack_header(window, position)
        if 0xFFFFFFFF in (fields[8], fields[9], fields[16]):
            return False  # zip64 sizes in an extra field
        position += _CENTRAL_HEADER_SIZE + fields[10] + fields[11] + fields[12]
        count += 1
        if count > entries or fields[16] + _LOCAL_HEADER.size > directory_offset:
            return False
    return bool(position == end and count == entries)


_TAIL_WINDOW = 1 << 16


class TailWindowSource:
    """A source whose last ``window`` bytes are read once, at the first read that falls there: the
    end record, the zip64 locator and (for most checkpoints) the central directory are one ``pread``,
    and a small file's head too, instead of one each."""

    __slots__ = ("_data", "_size", "_source", "_start")

    def __init__(self, source: ByteSource, size: int, window: int = _TAIL_WINDOW) -> None:
        self._source = source
        self._size = size
        self._start = max(0, size - window)
        self._data: bytes | None = None

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end), as the underlying source reads them."""
        if offset < self._start:
            return self._source.read(offset, length)
        if self._data is None:
            self._data = self._source.read(self._start, self._size - self._start)
        if offset + length > self._start + len(self._data):
            return self._source.read(offset, length)  # past what was there then: read it as it is now
        return self._data[offset - self._start : offset - self._start + length]


def check_zip_archive(source: ByteSource, size: int, *, verify: str = "zip") -> Completeness:
    """Judge the archive of ``size`` bytes that ``source`` reads: head, tail, central directory (and
    with ``verify="crc"`` every member's CRC-32). The rules for a file on disk and an object alike."""
    if size == 0:
        return Completeness(False, "empty: still being written")
    head = source.read(0, 4)
    if head != _LOCAL_HEADER_MAGIC:
        return Completeness(
            False, "not a zip archive (a legacy torch.save file or not a checkpoint)", not_zip=True
        )
    if size < _END_OF_CENTRAL_DIRECTORY_SIZE:
        return Completeness(False, _NO_END_RECORD)
    # torch.save writes no archive comment, so the record is almost always the last 22 bytes; read
    # the 20 before it too, where a zip64 locator would be.
    tail_length = min(size, _END_OF_CENTRAL_DIRECTORY_SIZE + _ZIP64_LOCATOR.size)
    tail = source.read(size - tail_length, tail_length)
    position = _find_end_record(tail)
    if position is None:
        tail_length = min(size, _END_OF_CENTRAL_DIRECTORY_SIZE + _MAXIMUM_COMMENT)
        tail = source.read(size - tail_length, tail_length)
        position = _find_end_record(tail)
        if position is None:
            return Completeness(False, _NO_END_RECORD)
    end_offset = size - tail_length + position
    record = tail[position : position + _END_OF_CENTRAL_DIRECTORY_SIZE]
    locator = tail[position - _ZIP64_LOCATOR.size : position] if position >= _ZIP64_LOCATOR.size else None
    try:
        directory_offset, directory_size, entries = _locate_central_directory(
            source, end_offset, record, locator
        )
        _walk_central_directory(source, directory_offset, directory_size, entries)
    except _NotWholeError as problem:
        return Completeness(False, f"central directory does not parse: {problem}")
    if verify == "crc":
        try:
            _check_member_crcs(source, directory_offset, directory_size)
        except _NotWholeError as problem:
            return Completeness(False, f"verify crc: {problem}", corrupt=True)
    return COMPLETE


def first_hole(file_descriptor: int, size: int) -> int | None:
    """Where the first hole before the end of the file is (lseek SEEK_HOLE), or None if it has none.

    SEEK_HOLE is asked rather than st_blocks compared with the size: compressing file systems report
    fewer blocks for a file without holes. A file system without SEEK_HOLE reports no hole.
    """
    try:
        hole = os.lseek(file_descriptor, 0, os.SEEK_HOLE)
    except OSError:
        return None
    return hole if hole < size else None


def _locate_central_directory(
    source: ByteSource, end_offset: int, record: bytes, locator: bytes | None
) -> tuple[int, int, int]:
    """(offset, size, entries) of the central directory, checked against where it must end.

    ``locator`` is the 20 bytes before the end record, if already read.
    """
    _, _, _, _, entries, directory_size, directory_offset, _ = _END_RECORD.unpack(record)
    directory_end = end_offset
    locator_offset = end_offset - _ZIP64_LOCATOR.size
    if locator_offset >= 0:
        if locator is None:
            locator = source.read(locator_offset, _ZIP64_LOCATOR.size)
        if locator[:4] == _ZIP64_LOCATOR_MAGIC:
            _, _, zip64_offset, _ = _ZIP64_LOCATOR.unpack(locator)
            if zip64_offset > locator_offset - _ZIP64_END_RECORD.size:
                raise _NotWholeError("the zip64 end record is missing")
            zip64_record = source.read(zip64_offset, _ZIP64_END_RECORD.size)
            if len(zip64_record) != _ZIP64_END_RECORD.size or zip64_record[:4] != _ZIP64_END_MAGIC:
                raise _NotWholeError("the zip64 end record is missing")
            fields = _ZIP64_END_RECORD.unpack(zip64_record)
            entries, directory_size, directory_offset = fields[7], fields[8], fields[9]
            directory_end = zip64_offset
    if entries == 0:
        raise _NotWholeError("the archive holds no entries")
    if directory_offset + directory_size != directory_end:
        raise _NotWholeError("it does not end where the end record says")
    if directory_size > _MAXIMUM_CENTRAL_DIRECTORY:
        raise _NotWholeError(f"implausibly large ({directory_size} bytes)")
    if entries > directory_size // _CENTRAL_HEADER_SIZE:
        raise _NotWholeError(f"{entries} entries cannot fit in {directory_size} bytes")
    return directory_offset, directory_size, entries


class _ChunkReader:
    """Sequential reads of one byte range of a file, a bounded chunk at a time."""

    def __init__(self, source: ByteSource, offset: int, length: int, chunk: int = _DIRECTORY_CHUNK) -> None:
        self._source = source
        self._position = offset
        self._end = offset + length
        self._chunk = chunk
        self._buffer = b""
        self._start = 0  # where the unread part of the buffer begins (no copy per read)
        self.consumed = 0

    def take(self, count: int) -> bytes:
        """The next ``count`` bytes (at most ~3 x 64 KiB: a header and its name, extra and comment)."""
        if len(self._buffer) - self._start < count:
            self._refill(count)
        data = self._buffer[self._start : self._start + count]
        self._start += count
        self.consumed += count
        return data

    def _refill(self, count: int) -> None:
        pieces = [self._buffer[self._start :]]
        available = len(pieces[0])
        while available < count:
            if self._position >= self._end:
                raise _NotWholeError("it is cut short")
            chunk = self._source.read(self._position, min(self._chunk, self._end - self._position))
            if not chunk:
                raise _NotWholeError("it is cut short")
            self._position += len(chunk)
            pieces.append(chunk)
            available += len(chunk)
        self._buffer = b"".join(pieces)
        self._start = 0

    @property
    def at_end(self) -> bool:
        """True once every byte of the range was taken."""
        return self._start >= len(self._buffer) and self._position >= self._end


@dataclass(frozen=True, slots=True)
class _Member:
    flags: int
    method: int
    crc: int
    compressed: int
    uncompressed: int
    local_offset: int


def _members(source: ByteSource, directory_offset: int, directory_size: int) -> Iterator[_Member]:
    """Every central-directory entry, streamed; raises _NotWholeError at the first malformed one."""
    reader = _ChunkReader(source, directory_offset, directory_size)
    while not reader.at_end:
        header = reader.take(_CENTRAL_HEADER_SIZE) if reader.consumed + 4 <= directory_size else b""
        if header[:4] != _CENTRAL_HEADER_MAGIC:
            raise _NotWholeError(
                f"no entry header at offset {directory_offset + reader.consumed - len(header)}"
            )
        fields = _CENTRAL_HEADER.unpack(header)
        flags, method = fields[3], fields[4]
        crc, compressed, uncompressed = fields[7], fields[8], fields[9]
        name_length, extra_length, comment_length = fields[10], fields[11], fields[12]
        local_offset = fields[16]
        reader.take(name_length)
        extra = reader.take(extra_length)
        reader.take(comment_length)
        if 0xFFFFFFFF in (compressed, uncompressed, local_offset):
            uncompressed, compressed, local_offset = _zip64_sizes(
                extra, uncompressed, compressed, local_offset
            )
        yield _Member(flags, method, crc, compressed, uncompressed, local_offset)


def _zip64_sizes(extra: bytes, uncompressed: int, compressed: int, local_offset: int) -> tuple[int, int, int]:
    """The 64-bit values a zip64 extra field holds for the 32-bit fields that are 0xFFFFFFFF."""
    position = 0
    while position + 4 <= len(extra):
        identifier, length = struct.unpack_from("<2H", extra, position)
        body = extra[position + 4 : position + 4 + length]
        if identifier == _ZIP64_EXTRA_ID:
            values = [uncompressed, compressed, local_offset]
            cursor = 0
            for index, value in enumerate(values):
                if value == 0xFFFFFFFF:
                    if cursor + 8 > len(body):
                        raise _NotWholeError("a zip64 extra field is cut short")
                    (values[index],) = struct.unpack_from("<Q", body, cursor)
                    cursor += 8
            return values[0], values[1], values[2]
        position += 4 + length
    raise _NotWholeError("an entry's zip64 sizes are missing")


def _walk_central_directory(
    source: ByteSource, directory_offset: int, directory_size: int, entries: int
) -> None:
    """Every central-directory header is there, and they end exactly where the end record says."""
    count = 0
    for member in _members(source, directory_offset, directory_size):
        count += 1
        if count > entries:
            break
        if member.local_offset + _LOCAL_HEADER.size > directory_offset:
            raise _NotWholeError(f"entry {count} starts past the central directory")
    if count != entries:
        raise _NotWholeError(f"{count} entries found where the end record says {entries}")


def _check_member_crcs(source: ByteSource, directory_offset: int, directory_size: int) -> None:
    """Read every member's data once, in bounded chunks, and compare its CRC-32 with the recorded one."""
    for index, member in enumerate(_members(source, directory_offset, directory_size), start=1):
        header = source.read(member.local_offset, _LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_HEADER_MAGIC:
            raise _NotWholeError(f"entry {index}: no local header where the central directory says")
        name_length, extra_length = _LOCAL_HEADER.unpack(header)[9:11]
        data_start = member.local_offset + _LOCAL_HEADER.size + name_length + extra_length
        if data_start + member.compressed > directory_offset:
            raise _NotWholeError(f"entry {index}: its data runs into the central directory")
        if member.flags & _ENCRYPTED_FLAG:
            raise _NotWholeError(f"entry {index} is encrypted: its CRC cannot be checked")
        if member.method == _STORED:
            if member.compressed != member.uncompressed:
                raise _NotWholeError(f"entry {index}: a stored entry whose two sizes differ")
            crc = _stored_crc(source, data_start, member.compressed)
        elif member.method == _DEFLATED:
            if member.uncompressed > member.compressed * _DEFLATE_MAXIMUM_RATIO + 1024:
                raise _NotWholeError(f"entry {index}: its declared size is more than deflate can give")
            crc = _deflated_crc(source, data_start, member, index)
        else:
            raise _NotWholeError(f"entry {index}: compression method {member.method} cannot be checked")
        if crc != member.crc:
            raise _NotWholeError(f"entry {index}: CRC-32 {crc:08x} where the archive says {member.crc:08x}")


def _data_chunks(source: ByteSource, start: int, length: int) -> Iterator[bytes]:
    position, end = start, start + length
    while position < end:
        chunk = source.read(position, min(_DATA_CHUNK, end - position))
        if not chunk:
            raise _NotWholeError("an entry's data is cut short")
        position += len(chunk)
        yield chunk


def _stored_crc(source: ByteSource, start: int, length: int) -> int:
    crc = 0
    for chunk in _data_chunks(source, start, length):
        crc = zlib.crc32(chunk, crc)
    return crc


def _deflated_crc(source: ByteSource, start: int, member: _Member, index: int) -> int:
    """Inflate in bounded steps; an entry that inflates past its declared size is refused at once."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    crc = 0
    produced = 0
    try:
        for chunk in _data_chunks(source, start, member.compressed):
            pending = chunk
            while pending:
                output = inflater.decompress(pending, _DATA_CHUNK)
                pending = inflater.unconsumed_tail
                produced += len(output)
                if produced > member.uncompressed:
                    raise _NotWholeError(
                        f"entry {index} inflates past its declared {member.uncompressed} bytes"
                    )
                crc = zlib.crc32(output, crc)
                if inflater.eof:
                    break
        output = inflater.flush(_DATA_CHUNK)
    except zlib.error as error:
        raise _NotWholeError(f"entry {index} does not inflate: {error}") from None
    produced += len(output)
    crc = zlib.crc32(output, crc)
    if produced != member.uncompressed:
        raise _NotWholeError(
            f"entry {index} inflates to {produced} bytes, not its declared {member.uncompressed}"
        )
    return crc


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


DeepCheck = Callable[[str], Completeness]


def check_file(
    path: str,
    *,
    dir_fd: int | None = None,
    follow_symlinks: bool = False,
    verify: str = "zip",
    deep_check: DeepCheck | None = None,
) -> tuple[Completeness, FileIdentity | None]:
    """Open ``path`` (only if it is a regular file, never blocking) and judge it.

    Returns the verdict and the identity of the file that was judged (None if it could not be opened).
    ``deep_check`` (``verify: load``) gets a path naming the very file already open. A file that changes
    while it is judged is reported so, and that verdict is transient.
    """
    try:
        file_descriptor, status = open_regular(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)
    except OSError as error:
        return _unopened(error), None
    identity = FileIdentity.of_stat(status)
    verdict = _judge_open(file_descriptor, status, path, dir_fd=dir_fd, verify=verify, deep_check=deep_check)
    if verdict is _CHANGED:
        return verdict, None
    return verdict, identity


def check_handle(
    handle: int,
    status: os.stat_result,
    path: str,
    *,
    dir_fd: int,
    process_descriptors: int | None,
    verify: str = "zip",
    deep_check: DeepCheck | None = None,
) -> Completeness:
    """``check_file`` of the entry an ``O_PATH`` ``handle`` already holds (``status`` is its ``fstat``,
    the identity the verdict is about): a one-shot scan takes the handle first, so its ``fstat`` is the
    entry's ``lstat`` too. The caller closes ``handle``; ``process_descriptors`` is as for
    ``filesystem.reopen_regular``."""
    try:
        file_descriptor, opened = reopen_regular(
            handle, status, path, dir_fd=dir_fd, process_descriptors=process_descriptors
        )
    except OSError as error:
        return _unopened(error)
    if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino):  # opened by name (no /proc)
        os.close(file_descriptor)
        return _CHANGED  # another file under the name now: the verdict is about neither (transient)
    return _judge_open(file_descriptor, opened, path, dir_fd=dir_fd, verify=verify, deep_check=deep_check)


def _unopened(error: OSError) -> Completeness:
    """The verdict on a file that could not be opened for reading."""
    if isinstance(error, NotRegularFileError):
        return Completeness(False, "not a regular file", transient=True)
    if isinstance(error, FileNotFoundError):
        return Completeness(False, "vanished while being checked", transient=True)
    return Completeness(False, f"cannot be read: {describe_os_error(error)}", transient=True)


# A file that changed while it was judged: the verdict is about no one version of it.
_CHANGED = Completeness(False, "still being written (it changed while being checked)", transient=True)


def _judge_open(
    file_descriptor: int,
    status: os.stat_result,
    path: str,
    *,
    dir_fd: int | None,
    verify: str,
    deep_check: DeepCheck | None,
) -> Completeness:
    """Judge the open regular file ``file_descriptor`` (``status`` is its ``fstat`` before reading), then
    close it; ``_CHANGED`` if its size or mtime moved while it was read."""
    try:
        verdict = check_zip_file(file_descriptor, status.st_size, verify="crc" if verify == "crc" else "zip")
        if verdict.complete and deep_check is not None:
            verdict = deep_check(_open_file_path(file_descriptor, path, dir_fd))
        after = os.fstat(file_descriptor)
    except OSError as error:
        return Completeness(False, f"cannot be read: {describe_os_error(error)}", transient=True)
    finally:
        os.close(file_descriptor)
    if after.st_size != status.st_size or after.st_mtime_ns != status.st_mtime_ns:
        return _CHANGED
    return verdict


def _open_file_path(file_descriptor: int, path: str, dir_fd: int | None) -> str:
    """A path to the very file open as ``file_descriptor`` (through /proc), else its own path."""
    through_proc = f"/proc/self/fd/{file_descriptor}"
    if os.path.exists(through_proc):
        return through_proc
    if dir_fd is not None and not os.path.isabs(path):
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return path


def check_zip_path(
    path: str, *, follow_symlinks: bool = False, dir_fd: int | None = None, size: int | None = None
) -> Completeness:
    """Open ``path`` read-only (not through a symlink unless asked) and judge it (``verify: zip``).

    ``size`` is accepted for compatibility; the size judged is always the open file's own.
    """
    del size
    return check_file(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)[0]


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
# What a writer writes last into a directory checkpoint: removing one first un-completes it at once.
DIRECTORY_MARKERS = frozenset({_DEEPSPEED_MARKER, _DCP_MARKER, _LIGHTNING_FSDP_MARKER, _HUGGING_FACE_MARKER})
# The file a layout writes last, with nothing written after it (DeepSpeed has none: its other ranks
# may still write after rank 0's `latest`). A file in the checkpoint newer than it (beyond coarse
# clocks) was written after it: the checkpoint was being saved again in place (a rolled-back run
# saving the same step, torch.distributed.checkpoint's default overwrite) when its writer died, and
# the old marker stands over new, partial files.
_WRITTEN_LAST = {
    "Hugging Face Trainer": _HUGGING_FACE_MARKER,
    "torch.distributed.checkpoint": _DCP_MARKER,
    "Lightning FSDP (sharded)": _LIGHTNING_FSDP_MARKER,
}
_MARKER_SLACK_NS = 2_000_000_000
# trainer_state.json is written in place (open "w", then write): a kill mid-write leaves it truncated.
_TRAINER_STATE_MAX_BYTES = 64 * 1024 * 1024
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
    names_best: str | None = None  # the name of the checkpoint its trainer_state.json calls the best
    # What changes while anything in it is written (TreeSummary.signature), for a long-lived scanner
    # to judge quiet by its own clock; None if it could not be walked.
    signature: tuple[int, int, int] | None = None


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


def check_directory(
    path: str,
    name: str,
    *,
    quiet_seconds: float,
    now: float,
    dir_fd: int | None = None,
    stop: threading.Event | None = None,
    trainer_states: TrainerStates | None = None,
) -> DirectoryVerdict:
    """Judge a directory checkpoint: its marker, and no file in it modified for ``quiet_seconds``.

    ``path`` is relative to ``dir_fd`` when given (then never through a symlink); ``name`` is the
    checkpoint's name (for its layout, and its entry in ``trainer_states``: a long-lived scanner's
    memory of what its trainer_state.json said). The walk never leaves the checkpoint's own mount: one
    that holds a mount point is never complete (so never deleted), whatever else it holds. It raises
    WalkStopped once ``stop`` is set (no verdict).
    """
    try:
        summary = summarize_tree(path, dir_fd=dir_fd, follow_symlinks=dir_fd is None, stop=stop)
    except FileNotFoundError:
        return DirectoryVerdict(Completeness(False, "vanished while being checked", transient=True), None, 0)
    except OSError as error:
        reason = f"cannot be read: {describe_os_error(error)}"
        return DirectoryVerdict(Completeness(False, reason, transient=True), None, 0)
    total = summary.bytes
    if summary.mount_points:
        where = summary.mount_points[0]
        reason = (
            "is itself a mount point: another file system, never deleted"
            if where == "."
            else f"contains a mount point ({where}): another file system, never deleted"
        )
        return DirectoryVerdict(Completeness(False, reason, transient=True, mount_point=where), None, total)
    verdict = judge_directory(
        summary.top_entries, name, summary.newest_mtime_ns, total, quiet_seconds=quiet_seconds, now=now
    )
    signature = summary.signature()
    if verdict.completeness.complete:
        known = _KnownTrainerState(trainer_states, name, now) if trainer_states is not None else None
        doubt, names_best = _marker_doubt(summary, verdict.layout, path, dir_fd, known)
        if doubt is not None:
            doubtful = Completeness(False, doubt, transient=True, suspicious=True)
            return DirectoryVerdict(doubtful, verdict.layout, total, signature=signature)
        return DirectoryVerdict(verdict.completeness, verdict.layout, total, names_best, signature)
    return replace(verdict, signature=signature)


def _marker_doubt(
    summary: TreeSummary, layout: str | None, path: str, dir_fd: int | None, known: _KnownTrainerState | None
) -> tuple[str | None, str | None]:
    """Why a directory checkpoint with its marker is still not whole: a file written after the marker,
    or a truncated ``trainer_state.json``; None if neither. Then the name of the checkpoint its
    ``trainer_state.json`` calls the best (Hugging Face's ``best_model_checkpoint``), if any."""
    doubt = _written_after_marker(layout, summary.newest_file_mtime_ns, summary.top_file_mtimes)
    if doubt is not None:
        return doubt, None
    # A Hugging Face checkpoint saved with DeepSpeed holds DeepSpeed's `latest` too (its layout is
    # DeepSpeed's), and its trainer_state.json is still what names the best and what a resume reads.
    if reads_trainer_state(layout, _HUGGING_FACE_MARKER in summary.top_file_mtimes):
        return _trainer_state_doubt(path, dir_fd, known)
    return None, None


def _written_after_marker(
    layout: str | None, newest_mtime_ns: int, top_mtimes: Mapping[str, int]
) -> str | None:
    """Why a directory checkpoint on disk whose layout's marker is written last is not whole: a file
    in it newer than the marker (``top_mtimes``: the files directly in it; its newest file's time
    ``newest_mtime_ns``) was written after it, by a save again in place that did not finish; None if
    not (or the layout has no such marker: DeepSpeed). Not for a bucket, whose upload order is the
    copying tool's."""
    marker = _WRITTEN_LAST.get(layout or "")
    if marker is None:
        return None
    marker_mtime = top_mtimes.get(marker)
    if marker_mtime is None:
        return f"its {marker}, written last, is not a regular file"
    if newest_mtime_ns > marker_mtime + _MARKER_SLACK_NS:
        newer = f"a file in it is newer than {marker}, which its writer writes last"
        return f"{newer}: saved again in place and not finished"
    return None


def _read_up_to(file_descriptor: int, size: int) -> bytes:
    """At most ``size`` bytes from the start of an open file (fewer if it has shrunk)."""
    chunks: list[bytes] = []
    while size > 0:
        chunk = os.read(file_descriptor, min(size, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


_BEST_KEY = "best_model_checkpoint"
# What an object of a trainer_state.json is parsed into when it has no best_model_checkpoint key: one
# dict shared by all of them, never changed (the file is read only to know it is whole JSON and what
# it calls the best).
_NOTHING_KEPT: dict[str, object] = {}


def _only_the_best(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object of trainer_state.json reduced to its best_model_checkpoint (if it has one): its
    log_history (one object per logging step, tens of MB in a long run) is then not held as dicts
    and floats while the file is parsed, only as references to one empty dict."""
    best = [value for key, value in pairs if key == _BEST_KEY]
    return {_BEST_KEY: best[-1]} if best else _NOTHING_KEPT  # the last of a repeated key, as json does


# A Hugging Face checkpoint's trainer_state.json, judged alike on disk (_marker_doubt) and in a bucket
# (bucket_trainer_state.py).
TRAINER_STATE_NAME = _HUGGING_FACE_MARKER
TRAINER_STATE_MAX_BYTES = _TRAINER_STATE_MAX_BYTES
TRAINER_STATE_TOO_LARGE = f"its {_HUGGING_FACE_MARKER} is over {_TRAINER_STATE_MAX_BYTES} bytes: not read"


def reads_trainer_state(layout: str | None, has_trainer_state: bool) -> bool:
    """True if a complete directory checkpoint of ``layout`` must have its trainer_state.json read (is
    it whole, what it calls the best), as _marker_doubt says: Hugging Face's, and DeepSpeed's with a
    trainer_state.json at its top (``has_trainer_state``: the Trainer saving with DeepSpeed)."""
    return _WRITTEN_LAST.get(layout or "") == _HUGGING_FACE_MARKER or (
        layout == "DeepSpeed" and has_trainer_state
    )


def _trainer_state_doubt(
    path: str, dir_fd: int | None, known: _KnownTrainerState | None = None
) -> tuple[str | None, str | None]:
    """Why ``path``'s trainer_state.json is not a whole JSON object (truncated by a kill), or None;
    then the last component of its ``best_model_checkpoint``, if it names one. With ``known``, a
    file with the very identity judged before is not read again."""
    flags = DIRECTORY_FLAGS if dir_fd is not None else DIRECTORY_FLAGS & ~os.O_NOFOLLOW
    try:
        directory = os.open(path, flags, dir_fd=dir_fd)
        try:
            file_descriptor, _ = open_regular(_HUGGING_FACE_MARKER, dir_fd=directory)
        finally:
            os.close(directory)
        try:
            return _judge_trainer_state(file_descriptor, known)
        finally:
            os.close(file_descriptor)
    except OSError as error:  # (never remembered: it may pass while the file stays the same)
        return f"its {_HUGGING_FACE_MARKER} cannot be read: {describe_os_error(error)}", None


def _judge_trainer_state(
    file_descriptor: int, known: _KnownTrainerState | None
) -> tuple[str | None, str | None]:
    """``_trainer_state_doubt`` of the open trainer_state.json. The identity remembered is the open
    file's own ``fstat`` (a file put in its place meanwhile is not taken for it), and only if it is
    the same after the read (else the bytes read are of no one version of it)."""
    status = os.fstat(file_descriptor)
    identity = _trainer_state_identity(status)
    if known is not None and (remembered := known.recall(identity)) is not None:
        return remembered
    if status.st_size > _TRAINER_STATE_MAX_BYTES:
        return TRAINER_STATE_TOO_LARGE, None
    data = _read_up_to(file_descriptor, status.st_size)
    unchanged = _trainer_state_identity(os.fstat(file_descriptor)) == identity
    verdict = trainer_state_best(data)
    if known is not None and unchanged:
        known.remember(identity, status, verdict)
    return verdict


def trainer_state_best(data: bytes) -> tuple[str | None, str | None]:
    """Why ``data`` (a whole trainer_state.json's bytes, at most ``TRAINER_STATE_MAX_BYTES``) is not a
    whole JSON object (cut), or None; then the last component of its ``best_model_checkpoint``, if it
    names one. On disk and in a bucket alike."""
    try:
        state = json.loads(data, object_pairs_hook=_only_the_best)
    except (ValueError, RecursionError):
        state = None
    if not isinstance(state, dict):
        return f"its {_HUGGING_FACE_MARKER}, written last, is not whole JSON: truncated", None
    best = state.get(_BEST_KEY)
    return None, os.path.basename(os.path.normpath(best)) if isinstance(best, str) and best else None


# The identity of a trainer_state.json as judged: device, inode, size, mtime and ctime (a rewrite that
# restores the mtime still moves the ctime).
_TRAINER_STATE_IDENTITY = struct.Struct("<QQqqq")
# A file changed this recently (mtime or ctime) is not remembered: timestamps are coarse (a clock tick),
# so a write landing in the same tick as the one read could leave the identity unchanged (as scan.py's
# verdict cache; the ctime too, as a rewrite that restores the mtime is known by its ctime).
_RACY_NANOSECONDS = 2_000_000_000


def _trainer_state_identity(status: os.stat_result) -> bytes:
    """The identity of the trainer_state.json ``status`` (its open descriptor's ``fstat``) describes."""
    return _TRAINER_STATE_IDENTITY.pack(
        status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns
    )


class SeenUnchanged:
    """How long this process has seen each directory checkpoint of one group unchanged (its
    ``TreeSummary.signature``, on ``clocks.watcher_clock``): a long-lived scanner counts one only once
    that is its quiet time too. Its files' times are its writers' clocks: ranks on a host whose clock
    is behind (NFS, Lustre) date files they are still writing long past, and this machine's wall clock
    may step forward; either way a checkpoint still being written counted, and pushed out the older
    whole one. Held by scan.CompletenessCache; ``retain`` drops the checkpoints a scan no longer sees."""

    __slots__ = ("_since",)

    def __init__(self) -> None:
        self._since: clocks.SeenSince[str, tuple[int, int, int]] = clocks.SeenSince()

    def judge(
        self,
        name: str,
        signature: tuple[int, int, int] | None,
        completeness: Completeness,
        *,
        quiet_seconds: float,
        now: float,
    ) -> Completeness:
        """``completeness`` (the verdict by its files' times), unless this process has not yet seen
        the checkpoint with this ``signature`` (what any write into it changes; None: it could not
        be walked) for ``quiet_seconds``: then not whole yet, due again when it will have (``now``
        is the scan's wall-clock time, for ``settles_at``)."""
        if signature is None:
            return completeness
        watched = self._since.watched(name, signature, clocks.watcher_clock()) or 0.0
        if not completeness.complete or watched >= quiet_seconds:
            return completeness
        reason = (
            f"seen unchanged for {watched:.1f} s of its quiet time {quiet_seconds:g} s by this watcher's "
            "clock (its files' times alone may come from a writer's clock behind)"
        )
        return Completeness(False, reason, settles_at=now + quiet_seconds - watched, transient=True)

    def retain(self, checkpoints: Iterable[str]) -> None:
        """Keep only the entries of these checkpoints (the names a scan of the group found)."""
        self._since.retain(checkpoints)


class TrainerStates:
    """What the trainer_state.json of each Hugging Face checkpoint of one group said (why it is not
    whole, or None; the best it names), with the identity of the file read: a long run's file is tens
    of MB, seconds to parse, and would be parsed again at every pass. Held by the long-lived scanner's
    cache (scan.CompletenessCache); ``retain`` drops the checkpoints a scan no longer sees."""

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: dict[str, tuple[bytes, str | None, str | None]] = {}

    def __len__(self) -> int:
        return len(self._known)

    def __contains__(self, checkpoint: object) -> bool:
        return checkpoint in self._known

    def recall(self, checkpoint: str, identity: bytes) -> tuple[str | None, str | None] | None:
        """(doubt, names_best) remembered for ``checkpoint``'s trainer_state.json with this identity."""
        known = self._known.get(checkpoint)
        if known is None or known[0] != identity:
            return None
        return known[1], known[2]

    def remember(self, checkpoint: str, identity: bytes, doubt: str | None, names_best: str | None) -> None:
        """What ``checkpoint``'s trainer_state.json of this identity says (its last version only)."""
        self._known[checkpoint] = (identity, doubt, names_best)

    def retain(self, checkpoints: Iterable[str]) -> None:
        """Keep only the entries of these checkpoints (the names a scan of the group found)."""
        if self._known:
            self._known = {name: self._known[name] for name in checkpoints if name in self._known}


@dataclass(frozen=True, slots=True)
class _KnownTrainerState:
    """One checkpoint's entry in ``TrainerStates``, as a scan at ``now`` sees it."""

    states: TrainerStates
    checkpoint: str
    now: float

    def recall(self, identity: bytes) -> tuple[str | None, str | None] | None:
        """What this checkpoint's trainer_state.json of this very identity said, if remembered."""
        return self.states.recall(self.checkpoint, identity)

    def remember(
        self, identity: bytes, status: os.stat_result, verdict: tuple[str | None, str | None]
    ) -> None:
        """Remember a verdict read whole from a file not changed within the last clock ticks."""
        if self.now * 1e9 - max(status.st_mtime_ns, status.st_ctime_ns) >= _RACY_NANOSECONDS:
            self.states.remember(self.checkpoint, identity, *verdict)


# A modification time further ahead of this machine's clock than this is not a write in progress but
# a writer's clock ahead (another host's, on a file system that keeps the writer's times): the
# checkpoint is not counted until this clock reaches it, which may be long, so it is warned about.
AHEAD_OF_THIS_CLOCK_SECONDS = 60.0


def not_settled(changed: str, age: float, wait: str, wait_seconds: float, settles_at: float) -> Completeness:
    """A checkpoint ``changed`` ``age`` seconds ago by this machine's clock, less than ``wait_seconds``
    (its ``wait``): still being written; or, dated far in the future, kept as suspicious (warned)."""
    if age < -AHEAD_OF_THIS_CLOCK_SECONDS:
        reason = (
            f"{changed} {-age:.0f} s in the future by this machine's clock (the writer's clock is "
            "ahead?): not counted before then"
        )
        return Completeness(False, reason, settles_at=settles_at, transient=True, suspicious=True)
    reason = f"still being written ({changed} {max(age, 0.0):.1f} s ago, {wait} {wait_seconds:g} s)"
    return Completeness(False, reason, settles_at=settles_at, transient=True)


def judge_directory(
    top_entries: set[str], name: str, newest_mtime_ns: int, total: int, *, quiet_seconds: float, now: float
) -> DirectoryVerdict:
    """The rules for a directory checkpoint's contents, on disk and in a bucket alike: its writer's
    marker among ``top_entries`` (the names directly in it), and nothing in it modified for
    ``quiet_seconds`` (``newest_mtime_ns`` is its newest file's time); ``total`` is its size."""
    layout, missing = _directory_layout(top_entries, name)
    newest = newest_mtime_ns / 1e9
    age = now - newest
    if missing is not None:  # quiet that long without its marker, it may never count: warned about
        suspicious = age >= quiet_seconds  # (a layout this tool does not know, or a save cut short)
        return DirectoryVerdict(
            Completeness(False, missing, transient=True, suspicious=suspicious), layout, total
        )
    if age < quiet_seconds:
        verdict = not_settled(
            "a file in it changed", age, "quiet time", quiet_seconds, newest + quiet_seconds
        )
        return DirectoryVerdict(verdict, layout, total)
    return DirectoryVerdict(COMPLETE, layout, total)
