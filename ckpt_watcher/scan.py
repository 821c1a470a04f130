"""Read checkpoint directories from disk into records for the planner; never follows a symlink.

Each directory is a group. The walk never descends into a symlinked directory, nor into a directory
whose own name is a checkpoint name (such a directory is one record). Reading never changes anything,
never opens anything but a regular file, and never walks what a symlink points at: a link's
completeness is its target's record when the target is in the same group, else at most one bounded,
non-blocking open of a regular-file target.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from ckpt_watcher.compact import KeysPacking, PackedKeys, PackedValues, ValuesPacking
from ckpt_watcher.filesystem import (
    HAS_HANDLES,
    PathResolver,
    WalkStopped,
    open_handle,
    open_process_descriptors,
)
from ckpt_watcher.integrity import (
    COMPLETE,
    DIRECTORY_QUIET_SECONDS,
    Completeness,
    SeenUnchanged,
    TrainerStates,
    check_directory,
    check_file,
    check_handle,
    not_settled,
)
from ckpt_watcher.lock import LOCK_FILE_NAME
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.naming import CHECKPOINT_EXTENSION, Kind, Naming
from ckpt_watcher.records import (
    DELETING_PREFIX,
    TRASH_DIRECTORY_NAME,
    CheckpointRecord,
    EntryType,
    FileIdentity,
    TreeSignature,
    display_name,
    path_prefix,
)

logger = structlog.get_logger("ckpt_watcher.scan")

UNFINISHED_MARKER_SUFFIX = "-unfinished"
TEMPORARY_SUFFIXES = (".tmp", ".partial")
# Files a download or copy tool keeps beside a file it is still writing under its final name:
#   aria2 `<name>.aria2` (its control file; the data file is pre-sized under its own name),
#   Firefox `<name>.part` (the data; a placeholder with the final name exists from the start),
#   huggingface_hub `<name>.incomplete`, Chrome `<name>.crdownload`, axel `<name>.st` (its state file),
#   lftp pget `<name>.lftp-pget-status`.
DOWNLOAD_MARKER_SUFFIXES = (".aria2", ".part", ".incomplete", ".crdownload", ".st", ".lftp-pget-status")
# Entries of a group that are the tool's own, never records: the lock file and the trash.
_NOT_CHECKPOINTS = frozenset({LOCK_FILE_NAME, TRASH_DIRECTORY_NAME})
# A verdict on a file modified this recently is not cached: mtimes are coarse (a clock tick), so a
# write landing in the same tick as the one judged would leave the identity unchanged.
_RACY_SECONDS = 2.0


class ScanStopped(Exception):  # noqa: N818  (an outcome asked for, not an error)
    """A scan ended early because its ``stop`` event was set; what it read so far must not be planned."""


@dataclass(frozen=True, slots=True)
class ScanProblem:
    """Something the scan could not read; logged, never fatal. ``unlisted``: a directory the walk
    found there but could not list (EACCES), so what is below it is unknown, not gone."""

    path: Path
    message: str
    unlisted: bool = False


@dataclass
class ScanResult:
    """Records of every group below the root, the groups themselves, and what could not be read."""

    records: list[CheckpointRecord] = field(default_factory=list)
    directories: list[Path] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)


PROGRESS_EVERY = 1024  # entries of a group between two calls of a scan's ``progress``


@dataclass(frozen=True)
class ScanOptions:
    """How strictly a file must look finished to count.

    ``settle_seconds``: a file modified more recently than this is still being written, unless its
    path is in ``closed_paths`` (its writer was seen closing it), it already counted as complete in this
    very version (an earlier pass saw it closed), or the cache already judged this very file (same
    device, inode, size, mtime). ``now`` is the wall-clock time to compare mtimes with (the
    caller's, so tests can fix it). ``verify`` is the policy's ``zip``, ``crc`` or ``load``. A directory
    checkpoint counts once nothing in it changed for ``directory_quiet_seconds`` (or the settle time):
    by its files' times, and with a cache (the daemon) also as the scanner itself saw it
    (integrity.SeenUnchanged).
    """

    settle_seconds: float = 0.0
    now: float | None = None
    closed_paths: frozenset[Path] = frozenset()
    verify: str = "zip"
    directory_quiet_seconds: float = DIRECTORY_QUIET_SECONDS

    @property
    def directory_quiet(self) -> float:
        """Seconds a directory checkpoint must be left alone to count: its own quiet time, or the
        settle time where that is longer (on disk and in a bucket alike)."""
        return max(self.settle_seconds, self.directory_quiet_seconds)


class CompletenessCache:
    """Verdicts on files by identity (device, inode, size, mtime) and verify level, complete or not,
    so a file is read once, however often it is scanned; and the identity each path had when it
    counted as complete, to notice a checkpoint that changes afterwards.

    Verdicts that may change while the file does not (a settle time, a marker beside it, an I/O
    error) are never stored. ``retain`` drops what a scan no longer sees, so it stays bounded by the
    group's entries. What its Hugging Face checkpoints' trainer_state.json said is kept beside
    (``trainer_states``), by the same rules.
    """

    def __init__(self) -> None:
        # By verify level, then identity packed into bytes; the identity a path counted with by the
        # hash of the path (a collision, ~3e-10 among 100,000 paths, could only misreport one
        # checkpoint_changed: a verdict is always looked up by the exact identity). Between passes
        # (after ``retain``) all of it is packed (``compact``): a daemon holds a few buffers per
        # group, not an object per file, so a big pass's memory goes back when it ends.
        self._verdicts: dict[str, dict[bytes, Completeness]] = {}
        self._counted: dict[int, bytes] = {}
        self._packed: tuple[dict[str, PackedKeys], PackedValues] | None = None
        # What a pass stores into an empty cache (a first pass), appended as it comes and packed by
        # ``retain`` as it is: no dict of 100,000 entries is made beside the records (~20 MB at the
        # peak of such a pass). Anything that reads the cache first turns it into the dicts.
        self._filling: _Filling | None = None
        self._trainer_states: TrainerStates | None = None  # made for the first directory checkpoint
        self._seen_unchanged: SeenUnchanged | None = None  # likewise

    def _unpack(self) -> None:
        """Back to dicts for a pass (what ``retain`` packed, or what a first pass filled)."""
        if self._packed is not None:
            verdicts, counted = self._packed
            self._verdicts = {verify: table.unpacked() for verify, table in verdicts.items()}
            self._counted = counted.unpacked()
            self._packed = None
        elif self._filling is not None:
            filling, self._filling = self._filling, None
            self._verdicts = {verify: dict(table.entries()) for verify, table in filling.verdicts.items()}
            self._counted = dict(filling.counted.entries())

    def _fill(self) -> _Filling | None:
        """Where a store goes without a lookup: the entries being filled, begun if the cache is empty;
        None if it holds anything else (a store then goes into the dicts)."""
        if self._filling is None and self._packed is None and not self._verdicts and not self._counted:
            self._filling = _Filling()
        return self._filling

    def __len__(self) -> int:
        self._unpack()
        return sum(len(verdicts) for verdicts in self._verdicts.values())

    def is_empty(self) -> bool:
        """True if it holds no verdict and no file counted as complete: ``recall`` would find nothing."""
        if self._filling is not None:
            return False  # begun by a store
        if self._packed is not None:
            verdicts, counted = self._packed
            return not len(counted) and not any(len(table) for table in verdicts.values())
        return not self._counted and not any(self._verdicts.values())

    def trainer_states(self) -> TrainerStates:
        """What the group's Hugging Face checkpoints' trainer_state.json said (integrity.TrainerStates)."""
        if self._trainer_states is None:
            self._trainer_states = TrainerStates()
        return self._trainer_states

    def seen_unchanged(self) -> SeenUnchanged:
        """How long each directory checkpoint of the group has been seen unchanged by this process
        (integrity.SeenUnchanged)."""
        if self._seen_unchanged is None:
            self._seen_unchanged = SeenUnchanged()
        return self._seen_unchanged

    def get(self, identity: FileIdentity, verify: str) -> Completeness | None:
        """The stored verdict on this very file at this verify level, if any."""
        self._unpack()
        verdicts = self._verdicts.get(verify)
        return verdicts.get(_packed(identity)) if verdicts is not None else None

    def store(self, identity: FileIdentity, verify: str, verdict: Completeness) -> None:
        """Remember a verdict that depends only on the file's bytes."""
        if verdict.transient:
            return
        key = _packed(identity)
        filling = self._fill()
        if filling is not None:
            table = filling.verdicts.get(verify)
            if table is None:
                table = filling.verdicts[verify] = KeysPacking(_IDENTITY.size)
            if table.append(key, verdict):
                return
        self._unpack()  # (an entry that does not fit: the dicts from here on)
        self._verdicts.setdefault(verify, {})[key] = verdict

    def counted(self, path: Path | str, identity: FileIdentity) -> None:
        """``path`` counts as complete with this identity."""
        key, packed = hash(os.fspath(path)), _packed(identity)
        filling = self._fill()
        if filling is not None and filling.counted.append(key, packed):
            return
        self._unpack()
        self._counted[key] = packed

    def counted_as(self, path: Path | str, identity: FileIdentity) -> bool:
        """True if ``path`` counted as complete with exactly this identity."""
        self._unpack()
        return self._counted.get(hash(os.fspath(path))) == _packed(identity)

    def recall(
        self, path: Path | str, identity: FileIdentity, kind: Kind, verify: str
    ) -> Completeness | None:
        """The cached verdict on the file at ``path`` (None: judge it), counted again if complete; a
        checkpoint that changed since it counted is forgotten as counted and logged once
        (``checkpoint_changed``; never ``last.ckpt``, rewritten by design). One place for the disk's
        scan and a bucket's listing; the path's key and the identity are packed once."""
        self._unpack()
        key, packed = hash(os.fspath(path)), _packed(identity)
        before = self._counted.get(key)
        if before is not None and before != packed:
            del self._counted[key]
            if kind is not Kind.LAST:
                logger.warning(
                    "checkpoint_changed",
                    path=display_name(str(path)),
                    old_bytes=FileIdentity(*_IDENTITY.unpack(before)).size,
                    new_bytes=identity.size,
                    detail="it changed after it counted as complete; judged again",
                )
        verdicts = self._verdicts.get(verify)
        cached = verdicts.get(packed) if verdicts is not None else None
        if cached is not None and cached.complete:
            self._counted[key] = packed
        return cached

    def retain(self, records: Iterable[CheckpointRecord]) -> None:
        """Keep only what concerns these records (the latest scan of the cache's directories), packed
        until the next pass (as it is found: no second copy of the cache is made on the way)."""
        records = list(records)
        if self._trainer_states is not None:
            self._trainer_states.retain(record.name for record in records)
        if self._seen_unchanged is not None:
            self._seen_unchanged.retain(record.name for record in records)
        if self._filling is not None and self._filling.concerns_only(records):
            filling, self._filling = self._filling, None
            self._packed = (
                {
                    verify: PackedKeys(table.entries(), width=_IDENTITY.size, common=COMPLETE)
                    for verify, table in filling.verdicts.items()
                },
                PackedValues.of_packing(filling.counted),
            )
            return
        self._unpack()
        self._packed = (
            {
                verify: PackedKeys(
                    _found(table, (_packed(record.identity) for record in records)),
                    width=_IDENTITY.size,
                    common=COMPLETE,  # most verdicts
                )
                for verify, table in self._verdicts.items()
            },
            PackedValues(
                _found(self._counted, (hash(text) for text in _path_texts(records))),
                width=_IDENTITY.size,
            ),
        )
        self._verdicts, self._counted = {}, {}


class _Filling:
    """What a pass stored into an empty cache, in the order stored (``CompletenessCache._fill``)."""

    __slots__ = ("counted", "verdicts")

    def __init__(self) -> None:
        self.verdicts: dict[str, KeysPacking] = {}
        self.counted = ValuesPacking(_IDENTITY.size)

    def concerns_only(self, records: list[CheckpointRecord]) -> bool:
        """True if every entry is about one of ``records``, met in their order: a verdict keyed by a
        record's identity, a path counted by a record's path. A scan stores each file's entries as it
        makes its record, so this holds for a whole pass, and the entries are then exactly what
        ``retain`` keeps of the dicts. (Where one identity was stored twice, the entries keep the
        verdict that is not simply complete: the safe one.)"""
        positions = dict.fromkeys(self.verdicts, 0)
        counted_at = 0
        for record, text in zip(records, _path_texts(records), strict=True):
            identity = _packed(record.identity)
            for verify, table in self.verdicts.items():
                at = positions[verify]
                if at < len(table) and table.key_at(at) == identity:
                    positions[verify] = at + 1
            if counted_at < len(self.counted) and self.counted.key_at(counted_at) == hash(text):
                counted_at += 1
        return counted_at == len(self.counted) and all(
            positions[verify] == len(table) for verify, table in self.verdicts.items()
        )


def _path_texts(records: Iterable[CheckpointRecord]) -> Iterator[str]:
    """Each record's ``path_text``; the prefix made once for a run of records of one directory."""
    directory: Path | None = None
    prefix = ""
    for record in records:
        if record.directory is not directory:
            directory = record.directory
            prefix = path_prefix(directory)
        yield prefix + record.name


Key = TypeVar("Key")
Value = TypeVar("Value")


def _found(table: Mapping[Key, Value], keys: Iterable[Key]) -> Iterator[tuple[Key, Value]]:
    """The entries of ``table`` for ``keys`` (those it has)."""
    for key in keys:
        value = table.get(key)
        if value is not None:
            yield key, value


_IDENTITY = struct.Struct("<QQqq")  # device, inode, size, mtime_ns


def _packed(identity: FileIdentity | None) -> bytes:
    if identity is None:
        return b""
    return _IDENTITY.pack(identity.device, identity.inode, identity.size, identity.mtime_ns)


NamingLookup = Callable[[Path], Naming]


def _lookup(naming: Naming | NamingLookup) -> NamingLookup:
    """One naming for every directory, or per-directory naming (per-run policies)."""
    if isinstance(naming, Naming):
        return lambda directory: naming
    return naming


def scan_tree(
    root: Path,
    naming: Naming | NamingLookup,
    options: ScanOptions = ScanOptions(),
    cache: CompletenessCache | None = None,
    options_for: Callable[[Path], ScanOptions] | None = None,
) -> ScanResult:
    """Scan ``root`` and every real (non-symlinked) directory below it.

    ``options_for`` gives a directory its own options (a per-run policy's ``verify``).
    """
    result = ScanResult()
    naming_for = _lookup(naming)
    for directory in walk_directories(root, naming_for, result.problems):
        result.directories.append(directory)
        directory_options = options_for(directory) if options_for is not None else options
        result.records.extend(
            scan_directory(root, directory, naming_for(directory), directory_options, cache, result.problems)
        )
    return result


def walk_directories(
    root: Path, naming: Naming | NamingLookup, problems: list[ScanProblem]
) -> Iterator[Path]:
    """Yield ``root`` and its subdirectories, depth first, skipping symlinks and checkpoint directories."""
    naming_for = _lookup(naming)
    pending = [root]
    while pending:
        directory = pending.pop()
        yield directory
        classify = naming_for(directory).classify
        try:
            with os.scandir(directory) as entries:
                children = [
                    Path(entry.path)
                    for entry in entries
                    if entry.is_dir(follow_symlinks=False)
                    and not entry.name.startswith(DELETING_PREFIX)
                    and entry.name != TRASH_DIRECTORY_NAME
                    and classify(entry.name, directory=True).kind is Kind.UNKNOWN
                ]
        except FileNotFoundError:
            continue
        except OSError as error:  # (not a directory now: gone as a group; else unreadable, not gone)
            message = f"cannot list directory: {error.strerror}"
            unlisted = not isinstance(error, NotADirectoryError)
            problems.append(ScanProblem(directory, message, unlisted=unlisted))
            continue
        pending.extend(sorted(children, reverse=True))


def is_group_directory(directory: Path) -> bool | None:
    """True if ``directory`` is a directory of its own (a group, unless its name is a checkpoint's),
    False if it is gone (or a file or a symlink now), None if that cannot be told now: a directory
    above it cannot be searched (EACCES), which is not gone, so what is known about it stays."""
    try:
        status = os.lstat(directory)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    except OSError:
        return None
    return stat.S_ISDIR(status.st_mode)


def _records_of(
    group: _Group,
    prefix: str,
    names: list[str],
    stop: threading.Event | None,
    progress: Callable[[], None] | None,
) -> list[CheckpointRecord]:
    """The records of ``names`` in ``group`` (ScanStopped once ``stop`` is set)."""
    records: list[CheckpointRecord] = []
    for position, name in enumerate(names):
        if stop is not None and stop.is_set():
            raise ScanStopped(str(group.directory))
        if progress is not None and not position % PROGRESS_EVERY:
            progress()
        if name in _NOT_CHECKPOINTS or name.startswith(DELETING_PREFIX):
            continue
        record = group.record_for(prefix, name)
        if record is not None:
            records.append(record)
    return records


def scan_directory(
    root: Path,
    directory: Path,
    naming: Naming,
    options: ScanOptions = ScanOptions(),
    cache: CompletenessCache | None = None,
    problems: list[ScanProblem] | None = None,
    *,
    stop: threading.Event | None = None,
    progress: Callable[[], None] | None = None,
) -> list[CheckpointRecord]:
    """One record per entry of ``directory`` other than its plain subdirectories.

    With ``stop``, a huge directory is left as soon as it is set (``ScanStopped``): a daemon asked to
    stop does not first read 60,000 checkpoints, nor the 300,000 files of one directory checkpoint.
    ``progress`` is called every ``PROGRESS_EVERY`` entries: a daemon's keep-alive (its heartbeat, which
    a liveness probe reads) goes on through a group that takes minutes.
    """
    now = options.now if options.now is not None else time.time()
    relative_directory = os.path.relpath(directory, root)
    prefix = "" if relative_directory == "." else relative_directory + os.sep
    records: list[CheckpointRecord] = []
    try:
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return []
    except OSError as error:
        if problems is not None:
            problems.append(ScanProblem(directory, f"cannot list directory: {describe_os_error(error)}"))
        return []
    try:
        # The names only (a DirEntry with its cached stat would cost ~600 bytes per file in a huge
        # directory); each entry is then stat'ed relative to the open directory.
        names = os.listdir(directory_fd)
        group = _Group(directory, directory_fd, markers_beside(names), naming, options, now, cache, stop)
        try:
            records = _records_of(group, prefix, names, stop, progress)
        finally:
            group.close()
        records = group.judge_links(records)
    except FileNotFoundError:
        return []
    except OSError as error:
        if problems is not None:
            problems.append(ScanProblem(directory, f"cannot list directory: {describe_os_error(error)}"))
        return []
    finally:
        os.close(directory_fd)
    return records


class _Identities:
    """``FileIdentity.of_stat`` for the files of one group, sharing one int object for what they share:
    their device, and the size of a run's checkpoints (often the same): 100,000 records held 200,000
    separate equal ints (~6 MB)."""

    __slots__ = ("_device", "_size")

    def __init__(self) -> None:
        self._device = -1  # the last device and size seen
        self._size = -1

    def of(self, status: os.stat_result) -> FileIdentity:
        device = status.st_dev
        if device == self._device:
            device = self._device
        else:
            self._device = device
        size = status.st_size
        if size == self._size:
            size = self._size
        else:
            self._size = size
        return FileIdentity(device, status.st_ino, size, status.st_mtime_ns)


# A checkpoint-named directory as its walk found it: the verdict, its files' bytes, the best its
# trainer_state.json names, and the walk's signature.
_DirectoryLook = tuple[Completeness, int, str | None, TreeSignature | None]


@dataclass
class _Group:
    """One directory being scanned: what every entry's record needs."""

    directory: Path
    directory_fd: int
    markers: dict[str, str]
    naming: Naming
    options: ScanOptions
    now: float
    cache: CompletenessCache | None
    stop: threading.Event | None  # ends the walk of a directory checkpoint (WalkStopped)
    resolver: PathResolver = field(default_factory=PathResolver)  # each link of the listing once
    # The text of an entry's path is this plus its name (as pathlib joins them), for the cache's keys.
    path_prefix: str = field(init=False)
    opens_first: bool = field(init=False, default=False)
    recalls: bool = field(init=False, default=False)  # the cache has something to recall
    process_descriptors: int | None = field(init=False, default=None)
    identities: _Identities = field(init=False, default_factory=_Identities)

    def __post_init__(self) -> None:
        self.path_prefix = path_prefix(self.directory)
        # An empty cache has nothing to recall: a first pass asks it nothing per file.
        self.recalls = self.cache is not None and not self.cache.is_empty()
        # With no verdict cached to spare a file its read (a one-shot scan, or the daemon's first pass
        # over the group), each entry's O_PATH handle is taken first: its fstat is the entry's lstat,
        # and a regular file is re-opened for reading through it. Later passes stat by name first and
        # open only what the cache does not know.
        if (self.cache is None or not len(self.cache)) and HAS_HANDLES:
            self.process_descriptors = open_process_descriptors()
            self.opens_first = True

    def close(self) -> None:
        """Close what the scan of this directory held open."""
        if self.process_descriptors is not None:
            os.close(self.process_descriptors)
            self.process_descriptors = None

    def record_for(self, relative_prefix: str, name: str) -> CheckpointRecord | None:
        """The record of one entry (a symlink's completeness is settled later by ``judge_links``)."""
        handle: int | None = None
        try:
            if self.opens_first:
                try:
                    handle = open_handle(name, dir_fd=self.directory_fd)
                except FileNotFoundError:
                    return None
                except OSError:
                    handle = None  # out of descriptors, say: the entry is stat'ed by name instead
            if handle is not None:
                status = os.fstat(handle)
            else:
                try:
                    status = os.stat(name, dir_fd=self.directory_fd, follow_symlinks=False)
                except FileNotFoundError:
                    return None
            return self._record_of(relative_prefix, name, status, handle)
        finally:
            if handle is not None:
                os.close(handle)

    def _record_of(
        self, relative_prefix: str, name: str, status: os.stat_result, handle: int | None
    ) -> CheckpointRecord | None:
        """The record of the entry ``status`` describes (``handle``: its O_PATH handle, if taken)."""
        mode = status.st_mode
        parsed = self.naming.classify(name, directory=stat.S_ISDIR(mode))
        if stat.S_ISDIR(mode):
            if parsed.kind is Kind.UNKNOWN:
                return None  # a plain subdirectory: its own group
            entry_type = EntryType.DIRECTORY
        elif stat.S_ISLNK(mode):
            entry_type = EntryType.SYMLINK
        elif stat.S_ISREG(mode):
            entry_type = EntryType.FILE
        else:
            entry_type = EntryType.OTHER
        identity = self.identities.of(status)
        link_target: Path | None = None
        completeness: Completeness
        names_best: str | None = None
        tree_signature: TreeSignature | None = None
        size = identity.size if entry_type is EntryType.FILE else 0
        if entry_type is EntryType.SYMLINK:
            link_target = self.resolver.resolve(self.directory / name)  # resolves names only: opens nothing
            completeness = Completeness(False, "symlink")
        elif entry_type is EntryType.FILE and parsed.kind is not Kind.UNKNOWN:
            completeness = self._file_completeness(name, identity, parsed.kind, status, handle)
        elif entry_type is EntryType.DIRECTORY:
            completeness, size, names_best, tree_signature = self._directory_completeness(name)
        else:
            completeness = Completeness(False, None)
        if self.cache is not None:  # the daemon: one string per name in all it keeps, shared with
            name = sys.intern(name)  # the poll's listing (one-shot: no use, and ~4 MB a 100k scan)
        # Positional, in the order of CheckpointRecord's fields: a scan makes one per entry, and 19
        # keywords cost more than the rest of the record (test_scan checks each field by name).
        return CheckpointRecord(
            self.directory,
            name,
            relative_prefix + name,  # relative_path (in the root's own group: that same string)
            parsed.kind,
            entry_type,
            size,  # bytes
            identity,
            completeness.complete,
            completeness.reason,  # incomplete_reason
            parsed.epoch,
            parsed.step,
            parsed.date,
            parsed.metric_name,
            parsed.metric,
            parsed.metric_text,
            parsed.version,
            link_target,
            parsed.note or _completeness_note(completeness),  # note
            completeness.settles_at,
            names_best,
            tree_signature,
        )

    def _directory_completeness(self, name: str) -> _DirectoryLook:
        """The verdict on a checkpoint-named directory, its files' bytes, the best its trainer_state.json
        names, and its walk's signature (ScanStopped if the stop comes during its walk)."""
        quiet_seconds = self.options.directory_quiet
        try:
            verdict = check_directory(
                name,
                name,
                quiet_seconds=quiet_seconds,
                now=self.now,
                dir_fd=self.directory_fd,
                stop=self.stop,
                trainer_states=self.cache.trainer_states() if self.cache is not None else None,
            )
        except WalkStopped:
            raise ScanStopped(str(self.directory / name)) from None
        completeness = verdict.completeness
        if self.cache is not None:  # the daemon: quiet by its own clock too (a one-shot looks once)
            seen = self.cache.seen_unchanged()
            completeness = seen.judge(
                name, verdict.signature, completeness, quiet_seconds=quiet_seconds, now=self.now
            )
        completeness = _with_markers(name, self.markers, None) or completeness
        return completeness, verdict.bytes, verdict.names_best, verdict.signature

    def judge_links(self, records: list[CheckpointRecord]) -> list[CheckpointRecord]:
        """Settle each checkpoint-named symlink's completeness from its target, never walking it."""
        if not any(record.entry_type is EntryType.SYMLINK for record in records):
            return records
        # All of them are entries of this directory: a target is one of them if it is here, by name.
        by_name = {record.name: record for record in records if record.entry_type is not EntryType.SYMLINK}
        judged: list[CheckpointRecord] = []
        for record in records:
            if record.entry_type is not EntryType.SYMLINK or record.kind is Kind.UNKNOWN:
                judged.append(record)
                continue
            link_target = record.link_target
            target = (
                by_name.get(link_target.name)
                if link_target is not None and link_target.parent == self.directory
                else None
            )
            if target is not None:
                completeness = Completeness(target.complete, target.incomplete_reason)
            else:
                completeness = self._linked_file_completeness(record)
            judged.append(
                dataclasses.replace(
                    record, complete=completeness.complete, incomplete_reason=completeness.reason
                )
            )
        return judged

    def _linked_file_completeness(self, link: CheckpointRecord) -> Completeness:
        """A link whose target is not in this group: never a directory walk, at most one bounded open."""
        try:
            status = os.stat(link.name, dir_fd=self.directory_fd)  # follows the link; opens nothing
        except FileNotFoundError:
            return Completeness(False, "dangling symlink")
        except OSError as error:
            return Completeness(False, f"its target cannot be read: {describe_os_error(error)}")
        if stat.S_ISDIR(status.st_mode):
            return Completeness(False, "symlink to a directory outside its group: not judged")
        if not stat.S_ISREG(status.st_mode):
            return Completeness(False, "symlink to something that is not a regular file")
        identity = FileIdentity.of_stat(status)
        if self.cache is not None and (cached := self.cache.get(identity, "zip")) is not None:
            return cached
        verdict, judged = check_file(link.name, dir_fd=self.directory_fd, follow_symlinks=True)
        self._store(judged, identity, "zip", verdict)
        return verdict

    def _file_completeness(
        self, name: str, identity: FileIdentity, kind: Kind, status: os.stat_result, handle: int | None
    ) -> Completeness:
        """The verdict on a checkpoint-named regular file (its ``Path`` made only for the cache or a
        settle time); read through ``handle`` if the scan took one."""
        if name.endswith(TEMPORARY_SUFFIXES):
            return Completeness(False, "temporary file name", transient=True)
        marked = _with_markers(name, self.markers, None)
        if marked is not None:
            return marked
        if self.recalls:
            assert self.cache is not None
            cached = self.cache.recall(self.path_prefix + name, identity, kind, self.options.verify)
            if cached is not None:
                return cached
        age = self.now - identity.mtime_ns / 1e9
        if age < self.options.settle_seconds and not self._closed(name, identity):
            settle = self.options.settle_seconds
            return not_settled("modified", age, "settle time", settle, identity.mtime_ns / 1e9 + settle)
        verify = self.options.verify
        deep_check = _verify_load if verify == "load" else None
        if handle is not None:
            verdict = check_handle(
                handle,
                status,
                name,
                dir_fd=self.directory_fd,
                process_descriptors=self.process_descriptors,
                verify=verify,
                deep_check=deep_check,
            )
            # The handle's fstat is the identity judged; a file that changed while it was read, or
            # could not be opened, has a transient verdict, which is never stored.
            self._store(identity, identity, verify, verdict)
        else:
            verdict, judged = check_file(name, dir_fd=self.directory_fd, verify=verify, deep_check=deep_check)
            self._store(judged, identity, verify, verdict)
        if self.cache is not None and verdict.complete:
            self.cache.counted(self.path_prefix + name, identity)
        return verdict

    def _closed(self, name: str, identity: FileIdentity) -> bool:
        """Its writer is done with it: it was closed (or moved into place) since the last pass, or it
        already counted as complete in this very version (an earlier pass saw it closed): a pass that
        another event brings before the settle time is over does not take that back."""
        if self.directory / name in self.options.closed_paths:
            return True
        return self.cache is not None and self.cache.counted_as(self.path_prefix + name, identity)

    def _store(
        self, judged: FileIdentity | None, identity: FileIdentity, verify: str, verdict: Completeness
    ) -> None:
        """Cache a verdict only if it is about the file the scan stat'ed and that file is not racy."""
        if self.cache is None or judged != identity:
            return
        if self.now - identity.mtime_ns / 1e9 < _RACY_SECONDS:
            return
        self.cache.store(identity, verify, verdict)


def _completeness_note(completeness: Completeness) -> str | None:
    """What a record's verdict warns about (``checkpoint_suspicious``): another mount in it, not an
    archive, corrupt, or a directory checkpoint its own files say is not whole."""
    return (
        _mount_note(completeness.mount_point)
        or ("not a zip archive" if completeness.not_zip else None)
        or ("corrupt: it does not load" if completeness.corrupt else None)
        or (completeness.reason if completeness.suspicious else None)
    )


def _mount_note(mount_point: str | None) -> str | None:
    """The note of a directory checkpoint that holds (or is) another mount."""
    if mount_point is None:
        return None
    if mount_point == ".":
        return "is itself a mount point"
    return f"contains a mount point ({mount_point})"


def _with_markers(
    name: str, markers: dict[str, str], completeness: Completeness | None
) -> Completeness | None:
    """Incomplete if a marker of a writer still at work is beside ``name``; else ``completeness``."""
    marker = markers.get(name)
    if marker is None:
        return completeness
    if marker.endswith(UNFINISHED_MARKER_SUFFIX):
        return Completeness(False, f"still being written ({marker} marker present)", transient=True)
    return Completeness(False, f"still being downloaded ({marker} beside it)", transient=True)


def marker_verdict(name: str, markers: dict[str, str]) -> Completeness | None:
    """Incomplete if a marker of a writer still at work is beside ``name`` (``markers_beside``); else
    None. For scans of other stores (a bucket) that apply the same rules."""
    return _with_markers(name, markers, None)


_MARKER_SUFFIXES = (UNFINISHED_MARKER_SUFFIX, *DOWNLOAD_MARKER_SUFFIXES)


def markers_beside(names: Iterable[str]) -> dict[str, str]:
    """Each name of a listing that has a writer's marker beside it, and that marker's name (one pass
    over the listing, so each file then costs one lookup)."""
    markers: dict[str, str] = {}
    for marker in names:
        if not marker.endswith(_MARKER_SUFFIXES):
            continue
        for suffix in _MARKER_SUFFIXES:
            if marker.endswith(suffix):
                base = marker.removesuffix(suffix)
                markers.setdefault(base, marker)
                if suffix == UNFINISHED_MARKER_SUFFIX:  # NeMo drops the .ckpt of the file it marks
                    markers.setdefault(base + CHECKPOINT_EXTENSION, marker)
    return markers


def unfinished_marker_name(checkpoint_name: str) -> str:
    """NeMo's marker for a checkpoint still being saved: the name without ``.ckpt`` plus ``-unfinished``."""
    return checkpoint_name.removesuffix(CHECKPOINT_EXTENSION) + UNFINISHED_MARKER_SUFFIX


def _verify_load(path: str) -> Completeness:
    """``verify: load``: the safe, mmap'd torch.load must succeed (torch is imported only here).

    ``path`` names the very file already judged (through /proc/self/fd), so it cannot be swapped.
    """
    from ckpt_watcher.contents import ContentsError, verify_loadable  # noqa: PLC0415  (lazy: torch)

    try:
        problem = verify_loadable(Path(path), follow_symlinks=True)
    except ContentsError as error:
        return Completeness(False, f"cannot verify: {error}", transient=True)
    if problem is not None:
        return Completeness(False, f"corrupt: {problem}", corrupt=True)
    return Completeness(True)
