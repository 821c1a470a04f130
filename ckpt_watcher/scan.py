"""Read checkpoint directories from disk into records for the planner; never follows a symlink.

Each directory is a group. The walk never descends into a symlinked directory, nor into a directory
whose own name is a checkpoint name (such a directory is one record). Reading never changes anything.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ckpt_watcher.integrity import (
    DIRECTORY_QUIET_SECONDS,
    Completeness,
    check_directory,
    check_zip_path,
)
from ckpt_watcher.lock import LOCK_FILE_NAME
from ckpt_watcher.naming import CHECKPOINT_EXTENSION, Kind, Naming
from ckpt_watcher.records import DELETING_PREFIX, CheckpointRecord, EntryType, FileIdentity, name_fields

UNFINISHED_MARKER_SUFFIX = "-unfinished"
_TEMPORARY_SUFFIXES = (".tmp", ".partial")


class ScanStopped(Exception):  # noqa: N818  (an outcome asked for, not an error)
    """A scan ended early because its ``stop`` event was set; what it read so far must not be planned."""


@dataclass(frozen=True, slots=True)
class ScanProblem:
    """Something the scan could not read; logged, never fatal."""

    path: Path
    message: str


@dataclass
class ScanResult:
    """Records of every group below the root, the groups themselves, and what could not be read."""

    records: list[CheckpointRecord] = field(default_factory=list)
    directories: list[Path] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)


@dataclass(frozen=True)
class ScanOptions:
    """How strictly a file must look finished to count.

    ``settle_seconds``: a file modified more recently than this is still being written, unless its
    path is in ``closed_paths`` (its writer was seen closing it) or the cache already judged this very
    file (same device, inode, size, mtime) complete. ``now`` is the wall-clock time to compare mtimes
    with (the caller's, so tests can fix it). ``verify`` is the policy's ``zip`` or ``load``. A directory
    checkpoint counts once nothing in it changed for ``directory_quiet_seconds`` (or the settle time).
    """

    settle_seconds: float = 0.0
    now: float | None = None
    closed_paths: frozenset[Path] = frozenset()
    verify: str = "zip"
    directory_quiet_seconds: float = DIRECTORY_QUIET_SECONDS


CompletenessCache = dict[FileIdentity, Completeness]
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
                    and classify(entry.name, directory=True).kind is Kind.UNKNOWN
                ]
        except FileNotFoundError:
            continue
        except OSError as error:
            problems.append(ScanProblem(directory, f"cannot list directory: {error.strerror}"))
            continue
        pending.extend(sorted(children, reverse=True))


def scan_directory(
    root: Path,
    directory: Path,
    naming: Naming,
    options: ScanOptions = ScanOptions(),
    cache: CompletenessCache | None = None,
    problems: list[ScanProblem] | None = None,
    *,
    stop: threading.Event | None = None,
) -> list[CheckpointRecord]:
    """One record per entry of ``directory`` other than its plain subdirectories.

    With ``stop``, a huge directory is left as soon as it is set (``ScanStopped``): a daemon asked to
    stop does not first read 60,000 checkpoints.
    """
    now = options.now if options.now is not None else time.time()
    relative_directory = os.path.relpath(directory, root)
    prefix = "" if relative_directory == "." else relative_directory + os.sep
    records: list[CheckpointRecord] = []
    try:
        # The names first (for the -unfinished markers), then one entry at a time: keeping every
        # DirEntry with its cached stat alive would cost ~600 bytes per file in a huge directory.
        names = set(os.listdir(directory))
        with os.scandir(directory) as iterator:
            for entry in iterator:
                if stop is not None and stop.is_set():
                    raise ScanStopped(str(directory))
                if entry.name == LOCK_FILE_NAME or entry.name.startswith(DELETING_PREFIX):
                    continue
                record = _record_for(prefix, directory, entry, names, naming, options, now, cache)
                if record is not None:
                    records.append(record)
    except FileNotFoundError:
        return []
    except OSError as error:
        if problems is not None:
            problems.append(ScanProblem(directory, f"cannot list directory: {error.strerror}"))
        return []
    return records


def _record_for(  # noqa: C901, PLR0912  (long: one branch per entry type, judged as a stat result is)
    relative_prefix: str,
    directory: Path,
    entry: os.DirEntry[str],
    names: set[str],
    naming: Naming,
    options: ScanOptions,
    now: float,
    cache: CompletenessCache | None,
) -> CheckpointRecord | None:
    try:
        status = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    mode = status.st_mode
    parsed = naming.classify(entry.name, directory=stat.S_ISDIR(mode))
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
    path = directory / entry.name
    identity = FileIdentity.of_stat(status)
    relative = relative_prefix + entry.name
    link_target: Path | None = None
    completeness: Completeness
    size = status.st_size if entry_type is EntryType.FILE else 0
    if entry_type is EntryType.SYMLINK:
        link_target = Path(os.path.realpath(path))
        if parsed.kind is Kind.UNKNOWN:
            completeness = Completeness(False, "symlink")
        elif link_target.is_dir():
            completeness = check_directory(
                str(link_target), link_target.name, quiet_seconds=0.0, now=now
            ).completeness
        else:
            completeness = check_zip_path(str(path), follow_symlinks=True)
    elif entry_type is EntryType.FILE and parsed.kind is not Kind.UNKNOWN:
        completeness = _file_completeness(entry.name, path, identity, names, options, now, cache)
    elif entry_type is EntryType.DIRECTORY:
        verdict = check_directory(
            str(path),
            entry.name,
            quiet_seconds=max(options.settle_seconds, options.directory_quiet_seconds),
            now=now,
        )
        size = verdict.bytes
        completeness = _with_marker(entry.name, names, verdict.completeness)
    else:
        completeness = Completeness(False, None)
    return CheckpointRecord(
        path=path,
        relative_path=relative,
        entry_type=entry_type,
        bytes=size,
        identity=identity,
        complete=completeness.complete,
        incomplete_reason=completeness.reason,
        link_target=link_target,
        note=parsed.note
        or ("not a zip archive" if completeness.not_zip else None)
        or ("corrupt: it does not load" if completeness.corrupt else None),
        settles_at=completeness.settles_at,
        **name_fields(parsed),
    )


def _with_marker(name: str, names: set[str], completeness: Completeness) -> Completeness:
    marker = unfinished_marker_name(name)
    if marker in names:
        return Completeness(False, f"still being written ({marker} marker present)")
    return completeness


def unfinished_marker_name(checkpoint_name: str) -> str:
    """NeMo's marker for a checkpoint still being saved: the name without ``.ckpt`` plus ``-unfinished``."""
    return checkpoint_name.removesuffix(CHECKPOINT_EXTENSION) + UNFINISHED_MARKER_SUFFIX


def _file_completeness(
    name: str,
    path: Path,
    identity: FileIdentity,
    names: set[str],
    options: ScanOptions,
    now: float,
    cache: CompletenessCache | None,
) -> Completeness:
    if name.endswith(_TEMPORARY_SUFFIXES):
        return Completeness(False, "temporary file name")
    marker = unfinished_marker_name(name)
    if marker in names:
        return Completeness(False, f"still being written ({marker} marker present)")
    if cache is not None and (cached := cache.get(identity)) is not None:
        return cached
    age = now - identity.mtime_ns / 1e9
    if age < options.settle_seconds and path not in options.closed_paths:
        return Completeness(
            False,
            f"still being written (modified {max(age, 0.0):.1f} s ago, "
            f"settle time {options.settle_seconds:g} s)",
            settles_at=identity.mtime_ns / 1e9 + options.settle_seconds,
        )
    completeness = check_zip_path(str(path), size=identity.size)
    if completeness.complete and options.verify == "load":
        completeness = _verify_load(path)
    if cache is not None and completeness.complete:
        cache[identity] = completeness
    return completeness


def _verify_load(path: Path) -> Completeness:
    """``verify: load``: the safe, mmap'd torch.load must succeed (torch is imported only here)."""
    from ckpt_watcher.contents import ContentsError, verify_loadable  # noqa: PLC0415  (lazy: torch)

    try:
        problem = verify_loadable(path)
    except ContentsError as error:
        return Completeness(False, f"cannot verify: {error}")
    if problem is not None:
        return Completeness(False, f"corrupt: {problem}", corrupt=True)
    return Completeness(True)
