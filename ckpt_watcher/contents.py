"""What is inside a checkpoint, read without loading its tensors. The only module that imports torch.

torch is imported lazily, inside the functions that read contents, so ``watch`` and ``prune`` never pay
for it. Files are opened with ``torch.load(map_location="cpu", mmap=True, weights_only=True)``: tensor
data stays on disk (memory stays far below the file size) and no pickle code runs. Objects the safe
loader refuses are named (``get_unsafe_globals_in_checkpoint``); loading them needs ``unsafe=True``.

Before torch sees a file, its archive is checked here, through the one descriptor that is then handed
to torch (``/proc/self/fd/N``, so the file checked is the file loaded): every member must be stored,
as ``torch.save`` writes them (a compressed member is how a 750 KiB file inflates to gigabytes), and
every member torch reads whole into memory (``data.pkl`` and a few small records; tensor storages are
mmap'd) must fit ``MAXIMUM_RECORD_BYTES``, and the pickle must parse (every opcode and argument, no code
run) in at most ``MAXIMUM_PICKLE_OPCODES`` opcodes. A pickle that does not parse is corrupt; only one
that parses and names objects the safe loader refuses is a case for ``--unsafe``.

Whatever a loadable pickle holds, each file gets its row: values are described, never trusted to be
what Lightning usually writes (non-finite scores, tensors where text is expected, lists for dicts).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import stat
import struct
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from ckpt_watcher.filesystem import real_path
from ckpt_watcher.integrity import check_directory, check_zip_file
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.naming import CHECKPOINT_EXTENSION, DEFAULT_NAMING, Kind, Naming

TORCH_MISSING = (
    "torch is not installed; reading checkpoint contents needs it: pip install 'ckpt-watcher[torch]'"
)
# What torch reads whole into memory before unpickling: the central directory and each non-storage
# record. A data.pkl takes ~90 bytes per tensor (3.6 MB for 40,000 tensors with their Adam state).
MAXIMUM_RECORD_BYTES = 32 << 20
MAXIMUM_CENTRAL_DIRECTORY = 64 << 20
# Each pickle opcode can build an object (4 MiB of EMPTY_LIST opcodes unpickle to 290 MiB): a pickle is
# parsed (not run) first, and refused beyond this many. Real ones take ~31 per tensor: ~128,000 tensors.
MAXIMUM_PICKLE_OPCODES = 4_000_000
# Containers and tensors looked at when describing one document (each costs a set entry).
MAXIMUM_OBJECTS_WALKED = 1_000_000
_MODEL_CHECKPOINT_PREFIX = "ModelCheckpoint"
_STORED = 0
_REFUSED = "refused: "
_COMPRESSION_NAMES = {8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstandard", 95: "xz"}

logger = structlog.get_logger("ckpt_watcher.contents")

# A JSON-ready description of a value that is not what the field usually holds, e.g.
# {"tensor": {"dtype": "float32", "shape": [2]}} or {"type": "list"}.
Described = dict[str, Any]


class ContentsError(Exception):
    """A checkpoint whose contents cannot be read, with the reason."""


@dataclass
class CallbackState:
    """One ModelCheckpoint callback's saved state; a value of an unexpected type is ``Described``.

    Scores are floats (``inf``/``nan`` included: Lightning stores ``inf`` for a NaN monitor).
    """

    key: str
    monitor: str | Described | None
    mode: str | None
    best_model_score: float | str | Described | None
    best_model_path: str | Described | None
    best_k_models: dict[str, float | str | Described | None]


@dataclass
class CheckpointContents:
    """Everything ``inspect`` reports about one file."""

    path: Path
    bytes: int = 0
    complete: bool = False
    integrity: str = ""
    loaded: bool = False
    epoch: int | None = None
    global_step: int | None = None
    lightning_version: str | Described | None = None
    resumable: bool | None = None
    has_optimizer_states: bool = False
    has_lr_schedulers: bool = False
    top_level_keys: list[str] = field(default_factory=list)
    model_checkpoints: list[CallbackState] = field(default_factory=list)
    tensor_count: int = 0
    tensor_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    archive_entries: int = 0
    layout: str | None = None
    unsafe_globals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True unless the file could not be read as a checkpoint at all."""
        return self.error is None


@dataclass(frozen=True, slots=True)
class ArchiveMember:
    """One central-directory entry: name, compression method, sizes, where its local header is."""

    name: str
    method: int
    compressed_size: int
    size: int
    header_offset: int


def _import_torch() -> Any:
    try:
        import torch  # noqa: PLC0415  (lazy by design: keep torch off the daemon's hot path)
    except ImportError:
        raise ContentsError(TORCH_MISSING) from None
    return torch


# -- inspect: paths in, one result per checkpoint out -----------------------------------------------


def inspect_paths(
    paths: Sequence[Path], *, unsafe: bool = False, naming: Naming = DEFAULT_NAMING
) -> list[CheckpointContents]:
    """``inspect``: expand directories, read each checkpoint; one file's failure is only its own row.

    Each failure is also logged (``inspect_failed``).
    """
    results: list[CheckpointContents] = []
    for path in expand_paths(paths, naming):
        try:
            result = inspect_checkpoint(path, unsafe=unsafe, naming=naming)
        except Exception as error:  # a per-file catch-all: a surprise costs this row, not the others
            result = CheckpointContents(path=path, error=f"could not be inspected: {_exception_text(error)}")
        if result.error is not None:
            logger.error("inspect_failed", path=str(result.path), error=result.error)
        results.append(result)
    return results


def expand_paths(paths: Sequence[Path], naming: Naming) -> list[Path]:
    """Files as given; a plain directory becomes its checkpoint files (sorted by step, then name).

    A directory that cannot be listed stays in the list, to be reported as its own error row.
    """
    expanded: list[Path] = []
    for path in paths:
        if not _is_directory(path) or naming.classify(path.name).kind is not Kind.UNKNOWN:
            expanded.append(path)
            continue
        try:
            entries = [
                entry
                for entry in path.iterdir()
                if entry.name.endswith(CHECKPOINT_EXTENSION) and not _is_directory(entry)
            ]
        except OSError:
            expanded.append(path)
            continue
        expanded.extend(sorted(entries, key=lambda entry: _inspect_order(entry, naming)))
    return expanded


def _is_directory(path: Path) -> bool:
    """Through symlinks, as the user means a path; False for anything that cannot be stat'ed."""
    try:
        return stat.S_ISDIR(path.stat().st_mode)
    except OSError:
        return False


def _inspect_order(path: Path, naming: Naming) -> tuple[int, int, str]:
    parsed = naming.classify(path.name)
    order = {Kind.STEP: 0, Kind.BEST: 1, Kind.LAST: 2}.get(parsed.kind, 3)
    return (order, parsed.step or 0, path.name)


def inspect_checkpoint(
    path: Path, *, unsafe: bool = False, naming: Naming = DEFAULT_NAMING
) -> CheckpointContents:
    """Read ``path`` (a file or a symlink to one) and describe it; a bad file is an error in the result."""
    contents = CheckpointContents(path=path)
    try:
        status = path.stat()
    except OSError as error:
        contents.error = f"cannot read it: {describe_os_error(error)}"
        return contents
    if stat.S_ISDIR(status.st_mode):
        _describe_directory(path, contents)
        return contents
    if not stat.S_ISREG(status.st_mode):
        contents.error = "not a regular file (a FIFO, socket or device is never read)"
        return contents
    try:
        file_descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        contents.error = f"cannot read it: {describe_os_error(error)}"
        return contents
    try:
        _inspect_open_file(file_descriptor, path, contents, unsafe, naming)
    finally:
        os.close(file_descriptor)
    return contents


def _describe_directory(path: Path, contents: CheckpointContents) -> None:
    directory = check_directory(str(path), real_path(path).name, quiet_seconds=0.0, now=time.time())
    contents.bytes = directory.bytes
    contents.layout = directory.layout
    contents.complete = directory.completeness.complete
    contents.integrity = "complete" if contents.complete else (directory.completeness.reason or "incomplete")
    if not contents.complete:
        contents.error = f"not a complete directory checkpoint: {contents.integrity}"
    else:
        contents.warnings.append(f"a {directory.layout} directory checkpoint: its files are not loaded")


def _inspect_open_file(
    file_descriptor: int, path: Path, contents: CheckpointContents, unsafe: bool, naming: Naming
) -> None:
    listing = _checked_archive(file_descriptor, contents)
    if listing is None:
        return
    try:
        torch = _import_torch()
    except ContentsError as error:
        contents.error = str(error)
        return
    source = _descriptor_path(file_descriptor, path)
    try:
        document = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        failure = _why_it_does_not_load(torch, source, error)
        contents.unsafe_globals = failure.refused
        if not (unsafe or failure.refused):
            contents.error = _in_terms_of(failure.problem, source, path)
            return
        if not unsafe:
            contents.warnings.append(
                "the safe loader refuses objects in this checkpoint "
                f"({', '.join(failure.refused)}); "
                "use --unsafe to load it anyway (runs its pickle code: only for files you trust)"
            )
            _describe_storages(listing, contents)
            return
        try:
            document = torch.load(source, map_location="cpu", mmap=True, weights_only=False)
        except Exception as unsafe_error:  # a pickle that parses can still raise anything when run
            contents.error = _in_terms_of(
                f"cannot be loaded even unsafely: {_exception_text(unsafe_error)}", source, path
            )
            return
    contents.loaded = True
    _describe_document(torch, document, contents)
    _check_name(path, contents, naming)


def _checked_archive(file_descriptor: int, contents: CheckpointContents) -> list[ArchiveMember] | None:
    """The archive's members if it is whole and safe to hand to torch; else None with the error set."""
    status = os.fstat(file_descriptor)
    if not stat.S_ISREG(status.st_mode):
        contents.error = "not a regular file (a FIFO, socket or device is never read)"
        return None
    contents.bytes = status.st_size
    listing = list_archive(file_descriptor, status.st_size)  # first: it bounds what it reads
    if isinstance(listing, str) and listing.startswith(_REFUSED):
        contents.error = listing
        return None
    verdict = check_zip_file(file_descriptor, status.st_size)
    contents.complete = verdict.complete
    contents.integrity = "complete zip archive" if verdict.complete else (verdict.reason or "incomplete")
    if not verdict.complete:
        contents.error = f"not a complete checkpoint: {contents.integrity}"
        return None
    if isinstance(listing, str):
        contents.error = listing
        return None
    contents.archive_entries = len(listing)
    problem = check_members(listing, status.st_size) or check_pickle(file_descriptor, listing)
    if problem is not None:
        contents.error = problem
        return None
    return listing


def verify_loadable(path: Path, *, follow_symlinks: bool = False) -> str | None:
    """For ``verify: load``: None if the safe, mmap'd load succeeds, else why it fails.

    A checkpoint whose pickle parses but holds objects the safe loader refuses still counts as
    loadable: its structure is whole. Raises ContentsError only when torch is missing; any other
    surprise is a reason, never an exception (the scan that calls this must go on).
    ``follow_symlinks`` is for a ``/proc/self/fd/N`` path: the very file the caller holds open.
    """
    torch = _import_torch()
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        file_descriptor = os.open(path, flags)
    except OSError as error:
        return f"cannot be read: {describe_os_error(error)}"
    try:
        status = os.fstat(file_descriptor)
        if not stat.S_ISREG(status.st_mode):
            return "not a regular file"
        listing = list_archive(file_descriptor, status.st_size)
        if isinstance(listing, str):
            return listing
        problem = check_members(listing, status.st_size) or check_pickle(file_descriptor, listing)
        if problem is not None:
            return problem
        source = _descriptor_path(file_descriptor, path)
        try:
            torch.load(source, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:
            failure = _why_it_does_not_load(torch, source, error)
            return None if failure.refused else _in_terms_of(failure.problem, source, path)
        return None
    except Exception as error:  # never let one file stop a scan
        return f"cannot be verified: {_exception_text(error)}"
    finally:
        os.close(file_descriptor)


@dataclass(frozen=True, slots=True)
class _LoadFailure:
    """Why the safe load of a pickle that parses failed: refused globals (``--unsafe`` may help), or else."""

    problem: str
    refused: list[str] = field(default_factory=list)


def _why_it_does_not_load(torch: Any, source: str, error: Exception) -> _LoadFailure:
    """Only a pickle that names globals the safe loader refuses needs --unsafe (it parsed already).

    Anything else (a missing storage record, a global the safe loader allows but cannot apply...) is
    the load error itself.
    """
    if isinstance(error, pickle.UnpicklingError):
        try:
            refused = sorted(
                str(name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(source)
            )
        except Exception:
            refused = []
        if refused:
            return _LoadFailure("the safe loader refuses objects in it", refused=refused)
        return _LoadFailure(f"the safe loader fails on it: {_weights_only_reason(error)}")
    return _LoadFailure(f"cannot be loaded: {_exception_text(error)}")


def check_pickle(
    file_descriptor: int, listing: list[ArchiveMember], *, maximum_opcodes: int = MAXIMUM_PICKLE_OPCODES
) -> str | None:
    """None if the archive's ``data.pkl`` parses (every opcode and argument; nothing is run) in at most
    ``maximum_opcodes`` opcodes; else why not: it is corrupt, or refused as too large to unpickle."""
    member = _pickle_member(listing)
    if member is None:
        return "the archive holds no data.pkl: not a torch.save checkpoint"
    try:
        data = _read_stored(file_descriptor, member)
        for count, _ in enumerate(pickletools.genops(io.BytesIO(data)), start=1):
            if count > maximum_opcodes:
                return (
                    f"refused: its pickle holds more than {maximum_opcodes} opcodes, more than "
                    "ckpt-watcher unpickles (each can build an object in memory)"
                )
    except Exception as error:  # genops raises ValueError, UnicodeDecodeError... on a corrupt pickle
        return f"its pickle is corrupt: {_exception_text(error)}"
    return None


def _pickle_member(listing: list[ArchiveMember]) -> ArchiveMember | None:
    """``<archive>/data.pkl``, where ``<archive>`` is the first entry's top directory (as torch reads it)."""
    if not listing:
        return None
    wanted = listing[0].name.split("/", 1)[0] + "/data.pkl"
    return next((member for member in listing if member.name == wanted), None)


def _read_stored(file_descriptor: int, member: ArchiveMember) -> bytes:
    header = os.pread(file_descriptor, _LOCAL_HEADER.size, member.header_offset)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise ValueError(f"no local header for {member.name!r}")
    name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
    start = member.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    data = os.pread(file_descriptor, member.size, start)
    if len(data) != member.size:
        raise ValueError(f"{member.name!r} is cut short")
    return data


# -- the archive, read by us before torch sees it ------------------------------------------------------

_END_RECORD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_HEADER = struct.Struct("<4s6H3L5H2L")
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_ZIP64_EXTRA_ID = 0x0001
_UNSET32 = 0xFFFFFFFF


def list_archive(file_descriptor: int, size: int) -> list[ArchiveMember] | str:
    """The members of the zip archive open as ``file_descriptor``, or why they cannot be listed.

    Reads the end record and the central directory only, at most ``MAXIMUM_CENTRAL_DIRECTORY`` bytes.
    """
    bounds = _central_directory_bounds(file_descriptor, size)
    if isinstance(bounds, str):
        return bounds
    entries, directory_size, directory_offset = bounds
    if directory_size > MAXIMUM_CENTRAL_DIRECTORY:
        return (
            f"refused: its central directory holds {directory_size} bytes, more than the "
            f"{MAXIMUM_CENTRAL_DIRECTORY} ckpt-watcher reads"
        )
    directory = os.pread(file_descriptor, directory_size, directory_offset)
    if len(directory) != directory_size:
        return "its central directory is cut short"
    members: list[ArchiveMember] = []
    position = 0
    while position < directory_size:
        if position + _CENTRAL_HEADER.size > directory_size:
            return "an entry of its central directory is cut short"
        fields = _CENTRAL_HEADER.unpack_from(directory, position)
        if fields[0] != b"PK\x01\x02":
            return f"no central directory entry at offset {directory_offset + position}"
        method, compressed, uncompressed = fields[4], fields[8], fields[9]
        name_length, extra_length, comment_length = fields[10], fields[11], fields[12]
        header_offset = fields[16]
        name_start = position + _CENTRAL_HEADER.size
        extra_start = name_start + name_length
        position = extra_start + extra_length + comment_length
        if position > directory_size:
            return "an entry of its central directory is cut short"
        name = directory[name_start:extra_start].decode("utf-8", "surrogateescape")
        sizes = _zip64_sizes(
            directory[extra_start : extra_start + extra_length], uncompressed, compressed, header_offset
        )
        if sizes is None:
            return f"archive member {name!r} has a malformed zip64 field"
        uncompressed, compressed, header_offset = sizes
        members.append(ArchiveMember(name, method, compressed, uncompressed, header_offset))
    if len(members) != entries:
        return f"{len(members)} entries found where the end record says {entries}"
    return members


def _central_directory_bounds(file_descriptor: int, size: int) -> tuple[int, int, int] | str:
    """(entries, size, offset) of the central directory, from the end record (and its zip64 form)."""
    tail_length = min(size, _END_RECORD.size + 0xFFFF)
    tail = os.pread(file_descriptor, tail_length, size - tail_length)
    position = tail.rfind(b"PK\x05\x06")
    while position != -1:
        record = tail[position : position + _END_RECORD.size]
        if len(record) == _END_RECORD.size:
            comment_length = _END_RECORD.unpack(record)[-1]
            if position + _END_RECORD.size + comment_length == len(tail):
                break
        position = tail.rfind(b"PK\x05\x06", 0, position)
    if position == -1:
        return "no end-of-central-directory record"
    fields = _END_RECORD.unpack(tail[position : position + _END_RECORD.size])
    entries, directory_size, directory_offset = fields[4], fields[5], fields[6]
    end_offset = size - tail_length + position
    locator_offset = end_offset - _ZIP64_LOCATOR.size
    if locator_offset >= 0:
        locator = os.pread(file_descriptor, _ZIP64_LOCATOR.size, locator_offset)
        if locator[:4] == b"PK\x06\x07":
            zip64_offset = _ZIP64_LOCATOR.unpack(locator)[2]
            record = os.pread(file_descriptor, _ZIP64_END_RECORD.size, zip64_offset)
            if len(record) != _ZIP64_END_RECORD.size or record[:4] != b"PK\x06\x06":
                return "the zip64 end record is missing"
            zip64 = _ZIP64_END_RECORD.unpack(record)
            entries, directory_size, directory_offset = zip64[7], zip64[8], zip64[9]
    if directory_offset + directory_size > size:
        return "its central directory lies beyond the end of the file"
    return entries, directory_size, directory_offset


def _zip64_sizes(
    extra: bytes, uncompressed: int, compressed: int, header_offset: int
) -> tuple[int, int, int] | None:
    """The real (uncompressed, compressed, header offset) where the 32-bit fields say "see zip64"."""
    if _UNSET32 not in (uncompressed, compressed, header_offset):
        return uncompressed, compressed, header_offset
    position = 0
    while position + 4 <= len(extra):
        field_id, length = struct.unpack_from("<2H", extra, position)
        body = extra[position + 4 : position + 4 + length]
        position += 4 + length
        if field_id != _ZIP64_EXTRA_ID:
            continue
        values = [uncompressed, compressed, header_offset]
        index = 0
        for slot in range(3):
            if values[slot] == _UNSET32:
                if index + 8 > len(body):
                    return None
                values[slot] = struct.unpack_from("<Q", body, index)[0]
                index += 8
        return values[0], values[1], values[2]
    return None


def check_members(
    members: list[ArchiveMember], size: int, *, maximum_record_bytes: int = MAXIMUM_RECORD_BYTES
) -> str | None:
    """None if torch may read this archive within bounded memory, else why it is refused.

    Every member must be stored (``torch.save`` compresses nothing; a compressed member is a possible
    decompression bomb), hold what it declares within the file, and, unless it is a tensor storage
    (``.../data/N``, mmap'd), fit ``maximum_record_bytes``.
    """
    for member in members:
        if member.method != _STORED:
            method = _COMPRESSION_NAMES.get(member.method, f"method {member.method}")
            return (
                f"refused: archive member {member.name!r} is compressed ({method}); torch.save stores "
                "every member, and a compressed one can expand to any size in memory"
            )
        if member.compressed_size != member.size:
            return (
                f"refused: archive member {member.name!r} declares {member.size} bytes "
                f"but stores {member.compressed_size}"
            )
        if member.header_offset + member.size > size:
            return f"refused: archive member {member.name!r} claims more bytes than the file holds"
        if "/data/" not in member.name and member.size > maximum_record_bytes:
            return (
                f"refused: archive member {member.name!r} holds {member.size} bytes, more than the "
                f"{maximum_record_bytes} ckpt-watcher reads into memory"
            )
    return None


def check_archive(
    file_descriptor: int, size: int, *, maximum_record_bytes: int = MAXIMUM_RECORD_BYTES
) -> str | None:
    """``list_archive`` then ``check_members``: None if the archive may be handed to torch."""
    listing = list_archive(file_descriptor, size)
    if isinstance(listing, str):
        return listing
    return check_members(listing, size, maximum_record_bytes=maximum_record_bytes)


def _describe_storages(listing: list[ArchiveMember], contents: CheckpointContents) -> None:
    """What the archive itself says when the pickle may not be loaded: tensor storages and their bytes."""
    storages = [member for member in listing if "/data/" in member.name]
    contents.tensor_count = len(storages)
    contents.tensor_bytes = sum(member.size for member in storages)
    contents.warnings.append(
        "tensor count and bytes are of storages in the archive (the pickle was not loaded)"
    )


def _descriptor_path(file_descriptor: int, path: Path) -> str:
    """A name torch can open that is the very file behind ``file_descriptor`` (no swap in between)."""
    through_proc = f"/proc/self/fd/{file_descriptor}"
    return through_proc if os.path.exists(through_proc) else str(path)


def _in_terms_of(message: str, source: str, path: Path) -> str:
    return message.replace(source, str(path)) if source != str(path) else message


# -- describing a loaded document, whatever it holds ----------------------------------------------------


def _describe_document(torch: Any, document: Any, contents: CheckpointContents) -> None:
    if isinstance(document, dict):
        contents.top_level_keys = [_as_key(torch, key) for key in document]
        contents.epoch = _as_int(torch, document.get("epoch"))
        contents.global_step = _as_int(torch, document.get("global_step"))
        contents.lightning_version = _as_text(torch, document.get("pytorch-lightning_version"))
        contents.has_optimizer_states = _is_non_empty_container(document.get("optimizer_states"))
        contents.has_lr_schedulers = "lr_schedulers" in document
        contents.resumable = contents.has_optimizer_states  # without optimizer state: weights only
        callbacks = document.get("callbacks")
        if isinstance(callbacks, dict):
            for key, state in callbacks.items():
                name = _as_key(torch, key)
                if not name.startswith(_MODEL_CHECKPOINT_PREFIX):
                    continue
                if isinstance(state, dict):
                    contents.model_checkpoints.append(_callback_state(torch, name, state, contents))
                else:
                    contents.warnings.append(f"{name}: its state is {_type_text(torch, state)}, not a dict")
    _count_tensors(torch, document, contents)


def _count_tensors(torch: Any, document: Any, contents: CheckpointContents) -> None:
    """Distinct tensors, their dtypes, and the bytes of their distinct storages."""
    seen_storages: set[tuple[int, int]] = set()
    dtypes: Counter[str] = Counter()
    uncounted = 0
    for tensor in _tensors_in(torch, document, contents):
        contents.tensor_count += 1
        dtypes[_dtype_text(tensor)] += 1
        try:
            storages = [part.untyped_storage() for part in _dense_parts(torch, tensor)]
        except Exception:  # a layout without storages (nested, meta...): counted, its bytes not
            uncounted += 1
            continue
        for storage in storages:
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen_storages:
                seen_storages.add(key)
                contents.tensor_bytes += storage.nbytes()
    contents.dtypes = dict(dtypes.most_common())
    if uncounted:
        contents.warnings.append(
            f"the bytes of {uncounted} tensor(s) without a plain storage are not counted"
        )


def _tensors_in(torch: Any, document: Any, contents: CheckpointContents) -> Iterator[Any]:
    """Each distinct tensor in dicts, lists and tuples, in document order; each container looked at once.

    A pickle can share one list many times (2**64 paths through 65 lists), so containers are
    remembered by identity, and at most ``MAXIMUM_OBJECTS_WALKED`` are looked at.
    """
    seen: set[int] = set()
    pending: list[Any] = [document]
    while pending:
        value = pending.pop()
        is_tensor = isinstance(value, torch.Tensor)
        if not is_tensor and not isinstance(value, dict | list | tuple):
            continue
        if id(value) in seen:
            continue
        if len(seen) >= MAXIMUM_OBJECTS_WALKED:
            contents.warnings.append(
                f"the document holds more than {MAXIMUM_OBJECTS_WALKED} containers and tensors: "
                "tensor counts cover the first ones only"
            )
            return
        seen.add(id(value))
        if is_tensor:
            yield value
        elif isinstance(value, dict):
            pending.extend(reversed(list(dict.values(value))))
        else:
            pending.extend(reversed(value))


def _dense_parts(torch: Any, tensor: Any) -> list[Any]:
    """The dense tensors that hold a (possibly sparse) tensor's data."""
    layout = tensor.layout
    if layout == torch.sparse_coo:
        return [tensor._indices(), tensor._values()]
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        return [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        return [tensor.ccol_indices(), tensor.row_indices(), tensor.values()]
    return [tensor]


def _callback_state(
    torch: Any, key: str, state: dict[Any, Any], contents: CheckpointContents
) -> CallbackState:
    best_k = state.get("best_k_models")
    best_k_models: dict[str, float | str | Described | None] = {}
    if isinstance(best_k, dict):
        best_k_models = {_as_key(torch, path): _as_score(torch, score) for path, score in best_k.items()}
    elif best_k is not None:
        contents.warnings.append(
            f"{key}: best_k_models is {_type_text(torch, best_k)}, not a dict of path to score"
        )
    best_model_path = _as_text(torch, state.get("best_model_path"))
    return CallbackState(
        key=key,
        monitor=_as_text(torch, state.get("monitor")),
        mode=_mode_from_key(key),
        best_model_score=_as_score(torch, state.get("best_model_score")),
        best_model_path=best_model_path if best_model_path != "" else None,
        best_k_models=best_k_models,
    )


def _mode_from_key(key: str) -> str | None:
    """Lightning keys the state as ``ModelCheckpoint{'monitor': ..., 'mode': 'min', ...}``."""
    marker = "'mode': '"
    start = key.find(marker)
    if start == -1:
        return None
    start += len(marker)
    end = key.find("'", start)
    return key[start:end] if end != -1 else None


def _describe(torch: Any, value: Any) -> Described:
    """A JSON-ready description of a value that is not what its field usually holds."""
    if isinstance(value, torch.Tensor):
        try:
            shape = [int(size) for size in value.shape]
        except Exception:
            shape = []
        return {"tensor": {"dtype": _dtype_text(value), "shape": shape}}
    return {"type": type(value).__name__}


def _type_text(torch: Any, value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor ({_dtype_text(value)})"
    return f"a {type(value).__name__}"


def _dtype_text(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _scalar(torch: Any, value: Any) -> float | None:
    """The number in a one-element real tensor or a plain number; None for anything else."""
    try:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex() or value.device.type == "meta":
                return None
            return float(value.item())
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    except Exception:  # an int too large for a float, a tensor that cannot be read...
        return None
    return None


def _as_score(torch: Any, value: Any) -> float | str | Described | None:
    """A score: a float (``inf``/``nan`` included), text as it is, anything else described."""
    if value is None or isinstance(value, str):
        return value
    number = _scalar(torch, value)
    return number if number is not None else _describe(torch, value)


def _as_text(torch: Any, value: Any) -> str | Described | None:
    if value is None or isinstance(value, str):
        return value
    return _describe(torch, value)


def _as_key(torch: Any, value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return str(value)
    if isinstance(value, torch.Tensor):
        return f"tensor({_dtype_text(value)})"
    return f"<{type(value).__name__}>"


def _as_int(torch: Any, value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = _scalar(torch, value)
    if number is None or not math.isfinite(number) or number != int(number):
        return None
    return int(number)


def _is_non_empty_container(value: Any) -> bool:
    return isinstance(value, list | tuple | dict) and len(value) > 0


def _check_name(path: Path, contents: CheckpointContents, naming: Naming) -> None:
    """A name that says one step while the contents say another is worth a warning."""
    resolved = real_path(path)
    parsed = naming.classify(resolved.name)
    if parsed.kind is Kind.UNKNOWN or parsed.step is None or contents.global_step is None:
        return
    if parsed.step != contents.global_step:
        contents.warnings.append(
            f"the name says step {parsed.step} but global_step is {contents.global_step}"
        )
    if parsed.epoch is not None and contents.epoch is not None and parsed.epoch != contents.epoch:
        contents.warnings.append(f"the name says epoch {parsed.epoch} but the contents say {contents.epoch}")


def _weights_only_reason(error: Exception) -> str:
    """The useful sentence of torch's long weights-only message."""
    text = str(error)
    marker = "WeightsUnpickler error: "
    start = text.find(marker)
    if start == -1:
        return text.splitlines()[0] if text else type(error).__name__
    return text[start + len(marker) :].splitlines()[0]


def _exception_text(error: BaseException) -> str:
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
