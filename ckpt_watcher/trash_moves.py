"""Moves in and out of the root's trash (layout and reading: trash.py): a deletion moved in
(``TrashTarget``, used by delete.py), a restore moved back, a purge moved out and removed.

Each move holds the trash's lock and re-reads the entry's metadata under it, so a purge, a restore and
a pass running at once never act twice on one entry. A move is a rename between directories opened
from the root with ``O_NOFOLLOW``, never replacing anything (``rename_no_replace``): it costs the same
for a 10 GB checkpoint as for a small one. The removal itself is delete.py's (``remove_trashed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import os
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from ckpt_watcher.budget import Reclaimable
from ckpt_watcher.delete import (
    Move,
    MoveOutcome,
    Outcome,
    open_below_root,
    pinned_since,
    remove_empty_directory,
    remove_name,
    remove_trashed,
)
from ckpt_watcher.filesystem import EntryStatus, rename_no_replace, status_at
from ckpt_watcher.logs import describe_os_error
from ckpt_watcher.plan import Decision
from ckpt_watcher.records import EntryType, display_name
from ckpt_watcher.trash import (
    FILES,
    INFO,
    METADATA_SUFFIX,
    NO_SPACE_ERRNOS,
    PURGING,
    RESTORED,
    ReadLaterError,
    RestoredPin,
    TrashDirectory,
    TrashEntry,
    TrashUnusableError,
    iso_time,
    locked,
    make_key,
    metadata_files,
    open_directory,
    open_trash,
    read_entries,
    read_entry,
    read_pin,
    read_pins,
    valid_relative_path,
    write_metadata,
)

logger = structlog.get_logger("ckpt_watcher.trash")

# A hidden temporary metadata file this old was left by a crash: removed by the next purge.
STALE_TEMPORARY_SECONDS = 600.0


def open_chain(
    parent_fd: int, parts: Sequence[str], *, create: bool, what: Path, owners: frozenset[int] = frozenset()
) -> int | None:
    """Open ``parent_fd/parts...`` one component at a time without following a symlink (making what is
    missing if ``create``); None if a component is missing. TrashUnusableError if one is not a
    directory (or, with ``owners``, not a trusted one: see trash.open_directory). The caller closes
    the descriptor."""
    current = os.dup(parent_fd)
    for index, part in enumerate(parts):
        try:
            child = open_directory(
                current, part, create=create, what=what.joinpath(*parts[: index + 1]), owners=owners
            )
        finally:
            os.close(current)
        if child is None:
            return None
        current = child
    return current


def _remove_empty_mirror(files_fd: int, parts: Sequence[str]) -> None:
    """Remove the directories of ``files/<parts>`` that are now empty, deepest first (under the lock:
    a move in may be about to use one)."""
    for depth in range(len(parts), 0, -1):
        parent = open_chain(files_fd, parts[: depth - 1], create=False, what=Path(FILES))
        if parent is None:
            return
        try:
            if not remove_empty_directory(parent, parts[depth - 1]):
                return
        finally:
            os.close(parent)


# -- into the trash ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrashTarget:
    """Moves one group's deletions into ``root``'s trash, each kept restorable ``grace_seconds``."""

    root: Path
    grace_seconds: int
    stop: threading.Event | None = None
    clock: Callable[[], float] = time.time
    on_move: Callable[[], None] | None = None  # told before each move (the trash may change)
    # The pins the pass read (``TrashIndex.known_pins``): one that cannot be read again at a move is
    # taken as read then, not as a reason to keep every checkpoint of the root, pass after pass.
    known_pins: Mapping[tuple[str, int], RestoredPin | None] = field(
        default_factory=dict, compare=False, hash=False
    )

    def move_in(self, directory_fd: int, decision: Decision) -> Move:
        """Move the checked checkpoint ``decision`` names into the trash; never raises."""
        if self.on_move is not None:
            self.on_move()
        try:
            return self._move_in(directory_fd, decision)
        except TrashUnusableError as error:
            if error.no_space:  # the trash could not even be made or locked: nothing was moved
                return Move(MoveOutcome.BYPASSED, f"no space for the trash: {error}")
            return Move(MoveOutcome.FAILED, str(error))
        except OSError as error:
            return Move(MoveOutcome.FAILED, describe_os_error(error))
        except Exception as error:
            return Move(MoveOutcome.FAILED, f"unexpected error: {type(error).__name__}: {error}")

    def _move_in(self, directory_fd: int, decision: Decision) -> Move:
        record = decision.record
        relative = os.path.relpath(record.path, self.root).replace(os.sep, "/")
        if not valid_relative_path(relative) or record.identity is None:
            return Move(MoveOutcome.FAILED, "its path cannot be recorded in the trash")
        group_device = os.fstat(directory_fd).st_dev
        trash = open_trash(self.root, create=True)
        assert trash is not None
        with trash:
            if trash.device != group_device:
                return Move(MoveOutcome.BYPASSED, "it is on another file system than the trash")
            with locked(trash, stop=self.stop):
                now = self.clock()
                held = _restored_meanwhile(
                    trash, record.identity.device, record.identity.inode, now, self.known_pins
                )
                if held is not None:
                    return held
                pinned = pinned_since(directory_fd, record.name)  # (the lock may have been waited for)
                if pinned is not None:
                    outcome, why = pinned
                    if outcome is Outcome.CHANGED:
                        return Move(MoveOutcome.CHANGED, f"{why}; kept")
                    return Move(MoveOutcome.FAILED, why)
                entry = TrashEntry(
                    key=make_key(now, record.identity.inode),
                    original=relative,
                    trashed_at=now,
                    grace_seconds=self.grace_seconds,
                    reasons=decision.reasons,
                    bytes=record.bytes,
                    is_directory=record.entry_type is EntryType.DIRECTORY,
                    device=record.identity.device,
                    inode=record.identity.inode,
                    mtime_ns=None if record.entry_type is EntryType.DIRECTORY else record.identity.mtime_ns,
                )
                move = _move_locked(trash, directory_fd, record.name, entry)
        if move.outcome is MoveOutcome.MOVED:
            logger.info(
                "checkpoint_trashed",
                path=display_name(str(record.path)),
                trash_path=display_name(str(trash.path(entry.trash_path))),
                kind=record.kind.value,
                step=record.step,
                bytes=record.bytes,
                reasons=list(decision.reasons),
                purge_at=iso_time(entry.purge_at),
            )
        return move


def _restored_meanwhile(
    trash: TrashDirectory,
    device: int,
    inode: int,
    now: float,
    known: Mapping[tuple[str, int], RestoredPin | None],
) -> Move | None:
    """Kept (CHANGED, with the pin's reason) if the checkpoint (device, inode) was restored and is
    pinned: restored after this pass planned it (a pass frozen, or waiting for this lock, while a
    ``prune`` trashed it and a ``restore`` put it back, same inode, size and mtime). Asked under the
    trash's lock, which a restore holds while it writes its pin and renames the checkpoint back. Kept
    too (FAILED) if a pin cannot be read: it may be this checkpoint's. A pin ``known`` has by its name
    and ``file_version`` (that very file, as a look read it) is not read again. A ``restored/`` refused but
    maybe this tool's (writable by every user) is read anyway, as the pass reads it. OSError if
    ``restored/`` cannot be listed (``move_in``: FAILED)."""
    if trash.unusable(RESTORED) is None:
        return _pinned_in(trash.sub(RESTORED), device, inode, now, known)
    try:
        restored = open_directory(trash.fd, RESTORED, create=False, what=trash.path(RESTORED))
    except TrashUnusableError as error:
        return Move(MoveOutcome.FAILED, f"the pins of restored checkpoints cannot be read ({error})")
    try:
        return _pinned_in(restored, device, inode, now, known)
    finally:
        if restored is not None:
            os.close(restored)


def _pinned_in(
    restored: int | None,
    device: int,
    inode: int,
    now: float,
    known: Mapping[tuple[str, int], RestoredPin | None],
) -> Move | None:
    """``_restored_meanwhile`` over the open ``restored/`` (None: there is none)."""
    problems: list[tuple[str, str]] = []
    for name, version in sorted(metadata_files(restored, versioned=True)):
        assert restored is not None
        if (name, version) in known:  # the very file a look read: it says what it said then (a move
            pin = known[(name, version)]  # reads only the pins new since, not 1,000 of a bulk restore)
        else:
            try:
                pin = read_pin(restored, name, problems, later=True)
            except ReadLaterError:
                why = dict(problems).get(name, "unknown")
                return Move(
                    MoveOutcome.FAILED, f"a pin of a restored checkpoint cannot be read ({name}: {why})"
                )
        if pin is not None and (pin.device, pin.inode) == (device, inode) and pin.until > now:
            return Move(MoveOutcome.CHANGED, f"{pin.reason} (restored since it was planned); kept")
    return None


def _move_locked(trash: TrashDirectory, directory_fd: int, name: str, entry: TrashEntry) -> Move:
    """Write the entry's metadata, then rename the checkpoint in; undo the metadata if it did not move.

    A full disk (or quota) that leaves no room for the metadata moves nothing and leaves nothing in
    the trash (``write_metadata`` writes whole or not at all): BYPASSED, so the checkpoint is deleted
    at once, as on another mount, and a full disk is pruned like any other."""
    files, info = trash.ensure(FILES), trash.ensure(INFO)
    mirror = open_chain(files, entry.parent_parts, create=True, what=trash.path(FILES), owners=trash.owners)
    assert mirror is not None
    try:
        try:
            write_metadata(info, entry.key, entry.document())
        except OSError as error:
            _tidy_mirror(files, entry.parent_parts)
            if error.errno in NO_SPACE_ERRNOS:
                why = f"no space for the trash record: {describe_os_error(error)}"
                return Move(MoveOutcome.BYPASSED, why)
            raise
        try:
            rename_no_replace(name, entry.stored_name, source_dir_fd=directory_fd, destination_dir_fd=mirror)
        except OSError as error:
            return _not_moved(info, files, entry, error)
        landed = status_at(mirror, entry.stored_name)
        if not entry.matches(landed):
            return _put_back(trash, mirror, directory_fd, name, entry, landed)
        return Move(MoveOutcome.MOVED)
    finally:
        os.close(mirror)


def _not_moved(info: int, files: int, entry: TrashEntry, error: OSError) -> Move:
    """The rename into the trash failed (the checkpoint is where it was): its metadata goes, and the
    move says why. Out of space for the move (a directory that must grow), and with its metadata
    gone, it is BYPASSED like a full disk's metadata; with its metadata left, FAILED (kept)."""
    left = remove_name(info, entry.key + METADATA_SUFFIX)
    _tidy_mirror(files, entry.parent_parts)
    if error.errno == errno.EXDEV:
        return Move(MoveOutcome.BYPASSED, "it is on another mount than the trash (EXDEV)")
    if isinstance(error, FileNotFoundError):
        return Move(MoveOutcome.GONE)
    if error.errno in NO_SPACE_ERRNOS and left is None:
        return Move(MoveOutcome.BYPASSED, f"no space in the trash to move it in: {describe_os_error(error)}")
    return Move(MoveOutcome.FAILED, describe_os_error(error))


def _tidy_mirror(files: int, parts: Sequence[str]) -> None:
    """After a move in that did not happen: the mirror directories it made, if empty; never raises
    (an empty directory left behind is harmless)."""
    with contextlib.suppress(TrashUnusableError, OSError):
        _remove_empty_mirror(files, parts)


def _put_back(
    trash: TrashDirectory,
    mirror: int,
    directory_fd: int,
    name: str,
    entry: TrashEntry,
    landed: EntryStatus,
) -> Move:
    """What was moved is not what was checked (swapped in between): move it back. If that cannot be
    done, it stays in the trash as an entry of its own (restorable), never lost."""
    info = trash.sub(INFO)
    assert info is not None
    try:
        rename_no_replace(entry.stored_name, name, source_dir_fd=mirror, destination_dir_fd=directory_fd)
    except OSError:
        remove_name(info, entry.key + METADATA_SUFFIX)
        directory = stat.S_ISDIR(landed.mode)
        actual = dataclasses.replace(
            entry,
            inode=landed.inode,
            is_directory=directory,
            bytes=0 if directory else landed.size,
            mtime_ns=None if directory else landed.mtime_ns,
        )
        write_metadata(info, entry.key, actual.document())
        return Move(MoveOutcome.CHANGED, "replaced just before the move; what replaced it is in the trash")
    remove_name(info, entry.key + METADATA_SUFFIX)
    return Move(MoveOutcome.CHANGED, "replaced just before the move; moved back")


# -- out of the trash: purge ------------------------------------------------------------------------


@dataclass
class PurgeResult:
    """What a purge removed, what it could not, and the broken entries it dropped."""

    purged: list[TrashEntry] = field(default_factory=list)
    failed: list[tuple[TrashEntry, str]] = field(default_factory=list)
    dropped: list[TrashEntry] = field(default_factory=list)
    interrupted: bool = False

    @property
    def bytes_purged(self) -> int:
        """Bytes of the entries removed."""
        return sum(entry.bytes for entry in self.purged)


def purge(
    root: Path,
    select: Callable[[TrashEntry], bool],
    *,
    why: str,
    now: float | None = None,
    stop: threading.Event | None = None,
) -> PurgeResult:
    """Remove every entry of ``root``'s trash that ``select`` picks (oldest first), then what earlier
    purges left half removed, expired pins and stale temporaries. ``why`` goes into each
    ``checkpoint_purged``. TrashUnusableError if the trash cannot be opened."""
    now = time.time() if now is None else now
    result = PurgeResult()
    trash = open_trash(root, create=False)
    if trash is None:
        return result
    with trash:
        for entry in read_entries(trash).entries:
            if stop is not None and stop.is_set():
                result.interrupted = True
                break
            if select(entry):
                _purge_one(trash, entry, why, result, stop)
        try:
            _tidy(trash, now, stop)
        except (TrashUnusableError, OSError) as error:
            message = describe_os_error(error) if isinstance(error, OSError) else str(error)
            logger.error("trash_purge_failed", path=display_name(str(trash.path())), error=message)
    return result


def purge_due(root: Path, *, now: float | None = None, stop: threading.Event | None = None) -> PurgeResult:
    """Remove the entries whose grace is over."""
    now = time.time() if now is None else now
    return purge(root, lambda entry: entry.purge_at <= now, why="its grace is over", now=now, stop=stop)


def purge_keys(root: Path, keys: Collection[str], *, stop: threading.Event | None = None) -> PurgeResult:
    """Remove the entries named by ``keys`` (``Reclaimable.key``): the space a budget chose to reclaim."""
    wanted = frozenset(keys)
    return purge(root, lambda entry: entry.key in wanted, why="its space was needed", stop=stop)


def reclaimable(root: Path) -> list[Reclaimable]:
    """One ``Reclaimable`` per entry of ``root``'s trash, oldest first (none without a trash)."""
    trash = open_trash(root, create=False)
    if trash is None:
        return []
    with trash:
        entries = read_entries(trash).entries
    return [Reclaimable(entry.key, entry.device, entry.bytes, entry.trashed_at) for entry in entries]


def _purge_one(
    trash: TrashDirectory, entry: TrashEntry, why: str, result: PurgeResult, stop: threading.Event | None
) -> None:
    """Under the lock, rename the entry out of reach (``purging/<KEY>``) and drop its metadata; then,
    without the lock, remove it (a stop leaves what remains there, for the next purge's ``_tidy``)."""
    try:
        purging = trash.ensure(PURGING)
        with locked(trash, stop=stop):
            problem = _take_out(trash, entry, purging)
    except (TrashUnusableError, OSError) as error:
        message = describe_os_error(error) if isinstance(error, OSError) else str(error)
        result.failed.append((entry, message))
        logger.error(
            "trash_purge_failed",
            path=display_name(str(trash.root / entry.original)),
            error=message,
            detail="still in the trash; retried by the next purge",
        )
        return
    if problem is not None:
        if problem:
            result.dropped.append(entry)
            logger.warning(
                "trash_entry_dropped",
                path=display_name(str(trash.root / entry.original)),
                key=entry.key,
                detail=problem,
            )
        return
    removal = remove_trashed(purging, entry.key, expected=entry.matches, stop=stop)
    if removal.stopped:
        result.interrupted = True
        _log_interrupted(trash.root / entry.original, trash.path(PURGING, entry.key))
        return
    if removal.outcome in (Outcome.DELETED, Outcome.ALREADY_GONE):
        result.purged.append(entry)
        logger.info(
            "checkpoint_purged",
            path=display_name(str(trash.root / entry.original)),
            trash_path=display_name(str(trash.path(entry.trash_path))),
            bytes=entry.bytes,
            trashed_at=iso_time(entry.trashed_at),
            why=why,
        )
        return
    result.failed.append((entry, removal.error or removal.outcome.value))
    logger.error(
        "trash_purge_failed",
        path=display_name(str(trash.root / entry.original)),
        error=removal.error,
        detail=f"what remains is in {display_name(str(trash.path(PURGING, entry.key)))}; "
        "retried by the next purge",
    )


def _log_interrupted(path: Path, left_as: Path) -> None:
    """A purge a stop cut short: what remains of the entry stays in ``purging/``."""
    logger.info(
        "removal_interrupted",
        path=display_name(str(path)),
        left_as=display_name(str(left_as)),
        detail="asked to stop; the rest is removed by the next purge (at the next start)",
    )


def _take_out(trash: TrashDirectory, entry: TrashEntry, purging: int) -> str | None:
    """Move an entry's data to ``purging/`` and drop its metadata. None when done; "" when the entry
    is no longer there (restored or purged meanwhile); else why the entry was dropped without its data
    being touched (missing, or not what was trashed)."""
    files, info = trash.ensure(FILES), trash.ensure(INFO)
    metadata = entry.key + METADATA_SUFFIX
    if read_entry(info, metadata, []) != entry:
        return ""
    try:
        mirror = open_chain(
            files, entry.parent_parts, create=False, what=trash.path(FILES), owners=trash.owners
        )
    except TrashUnusableError as error:
        remove_name(info, metadata)
        return f"its data cannot be reached: {error}; nothing there is followed or removed"
    if mirror is None:
        remove_name(info, metadata)
        return "its data is missing from the trash"
    try:
        try:
            status = status_at(mirror, entry.stored_name)
        except FileNotFoundError:
            remove_name(info, metadata)
            return "its data is missing from the trash"
        if not entry.matches(status):
            remove_name(info, metadata)
            return "what is stored under its name is not what was trashed; left where it is, never removed"
        rename_no_replace(entry.stored_name, entry.key, source_dir_fd=mirror, destination_dir_fd=purging)
    finally:
        os.close(mirror)
    remove_name(info, metadata)
    _remove_empty_mirror(files, entry.parent_parts)
    return None


def _tidy(trash: TrashDirectory, now: float, stop: threading.Event | None) -> None:
    """Finish half-done purges, drop expired pins and temporaries a crash left."""
    if not _finish_purges(trash, stop):
        return
    restored = trash.sub(RESTORED)
    if restored is not None:
        with locked(trash, stop=stop):
            for pin in read_pins(trash, []):
                if pin.until <= now:
                    remove_name(restored, pin.key + METADATA_SUFFIX)
    for name in (INFO, RESTORED):
        directory = trash.sub(name)
        if directory is not None:
            _remove_stale_temporaries(directory, now)


def _finish_purges(trash: TrashDirectory, stop: threading.Event | None) -> bool:
    """Remove what purges a failure or a stop cut short left in ``purging/``; False if ``stop`` ended it."""
    purging = trash.sub(PURGING)
    if purging is None:
        return True
    for name in sorted(os.listdir(purging)):
        if stop is not None and stop.is_set():
            return False
        removal = remove_trashed(purging, name, expected=None, stop=stop)
        if removal.stopped:
            _log_interrupted(trash.path(PURGING, name), trash.path(PURGING, name))
            return False
        if removal.outcome is Outcome.FAILED:
            logger.error(
                "trash_purge_failed",
                path=display_name(str(trash.path(PURGING, name))),
                error=removal.error,
                detail="retried by the next purge",
            )
    return True


def _remove_stale_temporaries(directory: int, now: float) -> None:
    for name in os.listdir(directory):
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        try:
            status = status_at(directory, name)
        except OSError:
            continue
        if stat.S_ISREG(status.mode) and now - status.mtime_ns / 1e9 > STALE_TEMPORARY_SECONDS:
            remove_name(directory, name)


# -- out of the trash: restore ----------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreResult:
    """One entry a restore was asked for: restored (pinned until when), or why not."""

    entry: TrashEntry
    restored: bool
    problem: str | None = None
    pinned_until: float | None = None


def select_entries(
    entries: Iterable[TrashEntry], patterns: Sequence[str], *, since: float | None, everything: bool
) -> list[TrashEntry]:
    """The entries a restore names: those whose relative path, name or key matches one of ``patterns``
    (globs), or all with ``everything`` (or with ``since`` alone), trashed at or after ``since``."""

    def named(entry: TrashEntry) -> bool:
        if everything or not patterns:
            return True
        return any(
            fnmatch.fnmatchcase(entry.original, pattern)
            or fnmatch.fnmatchcase(entry.name, pattern)
            or entry.key == pattern
            for pattern in patterns
        )

    return [entry for entry in entries if named(entry) and (since is None or entry.trashed_at >= since)]


def restore(
    root: Path,
    entries: Sequence[TrashEntry],
    *,
    now: float | None = None,
    stop: threading.Event | None = None,
) -> list[RestoreResult]:
    """Move ``entries`` back where they were, newest first, each pinned for its grace; never replaces
    anything (an entry whose name exists again is refused). Logs ``checkpoint_restored`` or
    ``restore_refused`` for each."""
    now = time.time() if now is None else now
    results: list[RestoreResult] = []
    ordered = sorted(entries, key=lambda entry: (entry.trashed_at, entry.key), reverse=True)
    trash = open_trash(root, create=False)
    if trash is None:
        return [_refused(root, entry, "the root has no trash") for entry in ordered]
    with trash:
        for entry in ordered:
            try:
                with locked(trash, stop=stop):
                    problem = _restore_locked(trash, entry, now)
            except TrashUnusableError as error:
                problem = str(error)
            except OSError as error:
                problem = describe_os_error(error)
            if problem is not None:
                results.append(_refused(root, entry, problem))
                continue
            until = now + entry.grace_seconds
            logger.info(
                "checkpoint_restored",
                path=display_name(str(root / entry.original)),
                trash_path=display_name(str(trash.path(entry.trash_path))),
                bytes=entry.bytes,
                trashed_at=iso_time(entry.trashed_at),
                pinned_until=iso_time(until),
            )
            results.append(RestoreResult(entry, restored=True, pinned_until=until))
    return results


def _refused(root: Path, entry: TrashEntry, problem: str) -> RestoreResult:
    logger.warning(
        "restore_refused", path=display_name(str(root / entry.original)), key=entry.key, error=problem
    )
    return RestoreResult(entry, restored=False, problem=problem)


def _restore_locked(trash: TrashDirectory, entry: TrashEntry, now: float) -> str | None:
    """Pin, then move one entry back (under the lock); None when done, else why it was not."""
    files, info = trash.sub(FILES), trash.sub(INFO)
    if files is None or info is None or read_entry(info, entry.key + METADATA_SUFFIX, []) != entry:
        return "no longer in the trash (restored or purged meanwhile)"
    mirror = open_chain(files, entry.parent_parts, create=False, what=trash.path(FILES), owners=trash.owners)
    if mirror is None:
        return "its data is missing from the trash"
    try:
        try:
            status = status_at(mirror, entry.stored_name)
        except FileNotFoundError:
            return "its data is missing from the trash"
        if not entry.matches(status):
            return "what is stored under its name in the trash is not what was trashed; not restored"
        target = _open_original_directory(trash.root, entry)
        try:
            return _move_back(trash, entry, mirror, target, now)
        finally:
            os.close(target)
    finally:
        os.close(mirror)


def _open_original_directory(root: Path, entry: TrashEntry) -> int:
    """The directory the entry came from, opened (made again if it is gone) from the root without
    following a symlink."""
    root_fd = open_below_root(root, root)
    try:
        target = open_chain(root_fd, entry.parent_parts, create=True, what=root)
    finally:
        os.close(root_fd)
    assert target is not None
    return target


def _move_back(trash: TrashDirectory, entry: TrashEntry, mirror: int, target: int, now: float) -> str | None:
    """Write the pin first (a pass that sees the file back sees its pin), then rename; never replace."""
    try:
        os.stat(entry.name, dir_fd=target, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        return f"{entry.original} exists again; it is never overwritten (move it away first)"
    restored, info = trash.ensure(RESTORED), trash.sub(INFO)
    assert info is not None
    pin_name = entry.key + METADATA_SUFFIX
    if entry.grace_seconds > 0:
        pin = RestoredPin(entry.key, entry.original, entry.device, entry.inode, now + entry.grace_seconds)
        remove_name(restored, pin_name)
        write_metadata(restored, entry.key, pin.document())
    try:
        rename_no_replace(entry.stored_name, entry.name, source_dir_fd=mirror, destination_dir_fd=target)
    except OSError as error:
        remove_name(restored, pin_name)
        if isinstance(error, FileExistsError):
            return f"{entry.original} exists again; it is never overwritten (move it away first)"
        return describe_os_error(error)
    remove_name(info, entry.key + METADATA_SUFFIX)
    files = trash.sub(FILES)
    assert files is not None
    _remove_empty_mirror(files, entry.parent_parts)
    return None
